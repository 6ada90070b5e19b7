"""
The coordinator of a proxy's online migrations: one per coordinating process
(the master, the single process, an embedded L{twistedproxy.api.Proxy}).

It decides which pools migrate (a reload that changes a C{migrate: true}
pool's servers), walks each migration through its phases, keeps its record
(what C{cacheproxyctl migration} prints) and its state across restarts (a
store, L{twistedproxy.migration.state}), and runs the mover
(L{twistedproxy.migration.mover}).

It reaches the processes that route requests only through an
L{IParticipants}: "route by this L{MigrationState}, and tell me when every one
does".  A migration:

  1. C{holding}: its plan (phase C{hold}) is pushed; once every routing
     process holds it, no process routes by the old placement alone;
  2. C{moving}: the plan in phase C{move} is pushed, then the mover runs
     (C{paused} when the operator pauses it or a backend fails; C{resume}
     goes on from the saved listing cursors);
  3. C{done} (or C{aborted} for an abort's reverse plan): the state without
     the plan is pushed; each removed server is listed once more, and the
     log says whether it still holds keys of the pool.

The server list in force for a pool may differ from its file's: after an
abort (the old list, until the file's list changes), or after a migration
that outlived a refused reload's change.  The state carries these lists
(L{MigrationState.servers}); C{accounted} is the file's list the coordinator
last acted on, so that a file naming it again changes nothing.
"""

from __future__ import annotations

import collections
from dataclasses import replace

from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface

from twistedproxy.config.migration import HOLD, MOVE, MigrationPlan, MigrationState, _server_dict
from twistedproxy.config.model import ServerSpec
from twistedproxy.config.values import ConfigError

log = Logger()

HOLDING, MOVING, PAUSED, DONE, ABORTED = "holding", "moving", "paused", "done", "aborted"
STATES = (HOLDING, MOVING, PAUSED, DONE, ABORTED)
ACTIONS = ("status", "pause", "resume", "abort")

# Keys of a pool's placement besides its servers: a migration keeps them (a change is refused).
PLACEMENT_KEYS = ("hash", "hash_tag", "distribution", "redis", "redis_db")

TICK = 1.0  # seconds between two looks at the running migrations (rate, saves, progress)
SAVE_EVERY = 3.0  # seconds between two saves of a running migration's cursors
LOG_EVERY = 10.0  # seconds between two progress lines in the log
RATE_WINDOW = 10.0  # seconds the rate is measured over


class MigrationRefused(ConfigError):
    """A reload (or a start) that a migration in progress does not allow; nothing was changed."""


class IParticipants(Interface):
    """The processes that route a coordinator's pools (the workers; or its own process)."""

    def apply(state):
        """
        Route by C{state} (a L{MigrationState}) from now on, in every such
        process; a Deferred fires once every live one does (fails: why not).
        """


def _specs(data) -> tuple:
    return tuple(ServerSpec(**s) for s in data) if data is not None else None


def _addresses(servers) -> list:
    return [s.address for s in servers]


class _Migration:
    """One pool's migration entry: its plan (if any), record, cursors and the lists in force."""

    def __init__(self, name):
        self.name = name
        self.plan = None
        self.record = None
        self.cursors = {}
        self.override = None  # the servers in force instead of the file's, or None
        self.accounted = None  # the file's list last acted on
        self.confirmed = None  # the phase every routing process confirmed holding the plan in
        self.finishing = False  # the plan is done, the state without it is being pushed
        self.done_plan = None  # the plan whose end is being pushed
        self.config = None  # the pool's PoolConfig (the mover's settings)
        self.mover = None
        self.samples = collections.deque()  # (time, keys moved so far) over the rate window
        self.saved_at = 0.0
        self.logged_at = 0.0

    def entry(self) -> dict:
        cursors = dict(self.mover.cursors) if self.mover is not None else dict(self.cursors)
        return {"plan": self.plan.to_dict() if self.plan is not None else None, "record": self.record,
                "cursors": cursors, "confirmed": self.confirmed,
                "override": [_server_dict(s) for s in self.override] if self.override is not None else None,
                "accounted": [_server_dict(s) for s in self.accounted] if self.accounted is not None else None}

    @classmethod
    def from_entry(cls, name, entry):
        self = cls(name)
        self.plan = MigrationPlan.from_dict(entry["plan"]) if entry.get("plan") else None
        self.record = entry.get("record")
        self.cursors = dict(entry.get("cursors") or {})
        self.confirmed = entry.get("confirmed")
        self.override = _specs(entry.get("override"))
        self.accounted = _specs(entry.get("accounted"))
        return self

    @property
    def state(self):
        return self.record["state"] if self.record is not None else None

    def fraction(self) -> float:
        if self.mover is not None:
            return self.mover.fraction
        if self.plan is None:
            return 1.0
        return sum(1 for c in self.cursors.values() if c == "done") / float(len(self.plan.servers))


class Coordinator:
    """
    The migrations of one proxy.  C{mover}: the class that moves a plan's keys
    (L{twistedproxy.migration.mover.Mover}, or a test's stand-in).
    """

    def __init__(self, reactor, participants, store, mover=None):
        self.reactor = reactor
        self.participants = participants
        self.store = store
        self.mover_class = mover
        self.migrations = {}  # pool name -> _Migration
        self.config = None  # the configuration file's, as last applied
        self.stopped = False
        self._ticker = None

    # -- what the routing processes route by ----------------------------------------

    @property
    def state(self) -> MigrationState:
        plans = tuple(m.plan for _, m in sorted(self.migrations.items()) if m.plan is not None)
        servers = tuple((name, m.override) for name, m in sorted(self.migrations.items())
                        if m.plan is None and m.override is not None)
        return MigrationState(plans=plans, servers=servers)

    def records(self, pool=None) -> dict:
        """pool name -> its record (every pool with one, or only C{pool}); the records are copies."""
        out = {}
        for name, m in sorted(self.migrations.items()):
            if m.record is not None and (pool is None or name == pool):
                out[name] = self._fresh(m)
        return out

    def _fresh(self, m) -> dict:
        record = dict(m.record)
        if m.state in (MOVING, PAUSED, HOLDING):
            record["rate"] = self._rate(m)
            fraction = m.fraction()
            elapsed = self.reactor.seconds() - record["started"]
            record["eta_seconds"] = (round(elapsed * (1 - fraction) / fraction, 1)
                                     if m.state == MOVING and 0 < fraction else None)
        return record

    def _rate(self, m) -> float:
        if len(m.samples) < 2:
            return 0.0
        (t0, k0), (t1, k1) = m.samples[0], m.samples[-1]
        return round((k1 - k0) / (t1 - t0), 1) if t1 > t0 else 0.0

    # -- start, restart -----------------------------------------------------------

    def restore(self, config) -> None:
        """
        Take up what the store kept (a restart or an upgrade), for the file's
        C{config}: a plan goes on in phase C{move} (nobody routes by the old
        placement any more) if the file names its list; it is aborted if the
        file names the list it moves from; else L{MigrationRefused}.
        """
        problems = []
        taken = {}
        for name, entry in sorted(self.store.load().items()):
            m = _Migration.from_entry(name, entry)
            pools = {pool.name: pool for pool in config.pools}
            pool = pools.get(name)
            if pool is not None and not pool.migrate:
                # Kept for a pool that does not migrate (any more): left alone, not routed by.
                log.warn("pool {pool}: migration state {where} ignored: the pool has no migrate: true",
                         pool=name, where=self._where(name))
                continue
            if m.plan is None:
                if pool is None or pool.is_front:
                    self.store.remove(name)
                    continue
                if m.state in (HOLDING, MOVING, PAUSED):
                    # Stopped while its end was pushed: every key had moved.
                    m.record["state"] = ABORTED if m.record.get("aborting") else DONE
                    m.record["finished"] = self.reactor.seconds()
                taken[name] = m
                continue
            plan = m.plan
            if pool is None:
                problems.append("pool %s was migrating from %s to %s (state file %s) but the configuration has"
                                " no such pool: add it back with either list" % (
                                    name, _addresses(plan.source), _addresses(plan.target), self._where(name)))
                continue
            m.config = pool
            named = pool.servers
            if named == m.accounted:
                pass  # goes on
            elif not plan.aborting and named == plan.source:
                log.warn("pool {pool}: the configuration names the servers the migration moves from: aborting it",
                         pool=name)
                self._reverse(m)
                m.accounted = named
            elif plan.aborting and named == plan.target:
                m.accounted = named  # the file went back to the list the abort restores
            else:
                problems.append("pool %s was migrating from %s to %s (state file %s) but the configuration lists"
                                " %s: name one of the two lists (the target goes on, the source aborts)" % (
                                    name, _addresses(plan.source), _addresses(plan.target), self._where(name),
                                    _addresses(named)))
                continue
            m.plan = replace(m.plan, phase=MOVE)
            m.confirmed = MOVE  # the routing processes start with this state
            if m.state == HOLDING or (m.state == PAUSED and m.record.get("error")):
                m.record["state"] = MOVING
                m.record["error"] = None
            taken[name] = m
        if problems:
            raise MigrationRefused(problems)
        self.migrations = taken
        self.config = config
        for pool in config.pools:
            m = self.migrations.get(pool.name)
            if m is not None and m.plan is None:
                self._file_changed(m, pool, m.override or pool.servers, started_phase=MOVE)
        for m in self.migrations.values():
            self._save(m)

    def _where(self, name) -> str:
        path = getattr(self.store, "path", None)
        return path(name) if path is not None else "in memory"

    def start(self) -> None:
        """Run: movers of plans in phase move, pushes of plans in phase hold."""
        for m in self.migrations.values():
            if m.plan is None:
                continue
            if m.confirmed != m.plan.phase:
                self._push()
            elif m.state == MOVING:
                self._run_mover(m)

    def stop(self, save: bool = True) -> None:
        """
        Stop every mover and stop saving: a stop (C{save}: the cursors first),
        or an upgrade's new master took over (not C{save}: the files are its).
        """
        for m in self.migrations.values():
            if m.mover is not None:
                if save:
                    self._save(m)
                m.mover.stop()
                m.mover = None
        self.stopped = True
        if self._ticker is not None and self._ticker.running:
            self._ticker.stop()
        self._ticker = None

    # -- reloads --------------------------------------------------------------------

    def reload(self, config) -> list:
        """
        Check a reload's C{config} against the migrations: raises
        L{MigrationRefused} when it cannot apply at all (a migrating pool
        removed, or its placement keys changed); otherwise starts the new
        migrations (phase hold: push the configuration with L{state}, then
        call L{reloaded}) and returns the refusals of pools whose change waits
        (the others' changes apply).
        """
        pools = {pool.name: pool for pool in config.pools}
        whole, refusals = [], []
        for name, m in sorted(self.migrations.items()):
            if m.plan is None:
                continue
            pool = pools.get(name)
            if pool is None or pool.is_front:
                whole.append(self._busy(m) + " (the configuration has no such pool with servers)")
            elif any(getattr(pool, key) != getattr(m.config, key) for key in PLACEMENT_KEYS):
                whole.append(self._busy(m) + " (its %s cannot change meanwhile)" % (", ".join(
                    key for key in PLACEMENT_KEYS if getattr(pool, key) != getattr(m.config, key)),))
            elif pool.servers != m.accounted:
                refusals.append(self._busy(m))
        if whole:
            raise MigrationRefused(whole)
        old = {pool.name: pool for pool in self.config.pools} if self.config is not None else {}
        self.config = config
        for pool in config.pools:
            if pool.is_front or pool.redis_cluster:
                continue
            m = self.migrations.get(pool.name)
            if m is not None and m.plan is not None:
                m.config = replace(pool, servers=m.config.servers)
                continue
            before = old.get(pool.name)
            if before is None and m is None:
                continue
            in_force = m.override if m is not None and m.override is not None else before.servers if before else None
            if m is None:
                m = _Migration(pool.name)
                m.accounted = before.servers
            if in_force is None:
                m.override, m.accounted = None, pool.servers
            elif before is not None and any(getattr(pool, key) != getattr(before, key) for key in PLACEMENT_KEYS):
                if pool.migrate and pool.servers != in_force:
                    log.warn("pool {pool}: its placement ({keys}) changed with its servers: rebuilt without moving"
                             " keys", pool=pool.name, keys=", ".join(PLACEMENT_KEYS))
                m.override, m.accounted = None, pool.servers
            else:
                self._file_changed(m, pool, in_force, started_phase=HOLD)
            if m.record is not None or m.override is not None or m.plan is not None:
                self.migrations[pool.name] = m
                self._save(m)
        for name in [name for name in self.migrations if name not in pools]:
            del self.migrations[name]
            self.store.remove(name)
        return refusals

    def _file_changed(self, m, pool, in_force, started_phase) -> None:
        """The file names C{pool.servers} for a pool running on C{in_force}: keep, drop the override, or migrate."""
        named = pool.servers
        if named == m.accounted:
            return  # nothing new in the file: what is in force stays
        m.accounted = named
        if named == in_force:
            m.override = None
        elif pool.migrate:
            m.override = None
            self._begin(m, pool, in_force, named, started_phase)
        else:
            m.override = None  # a pool without migrate: rebuilt on the file's list, as always

    def reloaded(self, ok: bool = True, error: str = "") -> None:
        """The reload's configuration and L{state} are pushed (C{ok}), or not: go on with the new migrations."""
        pending = [m for m in self.migrations.values() if m.plan is not None and m.confirmed != m.plan.phase]
        if ok:
            self._confirmed(self.state)
        else:
            for m in pending:
                self._do_pause(m, "the workers did not all take the plan: %s" % (error,))

    def _busy(self, m) -> str:
        what = "aborting a migration" if m.plan.aborting else "migrating"
        return ("pool %s is %s (from %d to %d servers, %d%% done): wait until it ends or abort it"
                " (cacheproxyctl migration abort %s)" % (m.name, what, len(m.plan.source), len(m.plan.target),
                                                          int(100 * m.fraction()), m.name))

    def _begin(self, m, pool, source, target, phase) -> None:
        now = self.reactor.seconds()
        plan = MigrationPlan(pool=pool.name, source=tuple(source), target=tuple(target), phase=phase,
                             id="%s-%d" % (pool.name, int(now * 1000)))
        m.plan, m.config, m.cursors, m.mover, m.finishing = plan, pool, {}, None, False
        m.confirmed = phase if phase == MOVE else None
        m.samples.clear()
        m.record = {"pool": pool.name, "id": plan.id, "state": HOLDING if phase == HOLD else MOVING,
                    "aborting": False, "error": None, "source": _addresses(plan.source),
                    "target": _addresses(plan.target), "removed": _addresses(plan.removed), "scanned": 0,
                    "moved": 0, "skipped": 0, "failed": 0, "bytes": 0, "rate": 0.0, "eta_seconds": None,
                    "started": now, "finished": None, "drained": []}
        log.info("pool {pool}: migration {id} from {source} to {target} starts", pool=pool.name, id=plan.id,
                 source=", ".join(m.record["source"]), target=", ".join(m.record["target"]))

    def _reverse(self, m) -> None:
        """Turn C{m}'s plan round: its source becomes the target again (an abort), phase hold."""
        plan = m.plan
        m.plan = MigrationPlan(pool=plan.pool, source=plan.target, target=plan.source, phase=HOLD, id=plan.id,
                               aborting=True)
        m.confirmed = None
        m.cursors = {}
        m.record.update({"state": HOLDING, "aborting": True, "error": None, "source": _addresses(m.plan.source),
                         "target": _addresses(m.plan.target), "removed": _addresses(m.plan.removed),
                         "eta_seconds": None})

    # -- the phases ------------------------------------------------------------------

    def _push(self) -> None:
        """Push the state; once every routing process has it, go on with the migrations it carried."""
        state = self.state
        d = self.participants.apply(state)
        d.addCallbacks(lambda _: self._confirmed(state), lambda failure: self._not_confirmed(state, failure))

    def _carried(self, state):
        """The migrations whose plan C{state} carries as it is now (not changed since), with that plan."""
        for plan in state.plans:
            m = self.migrations.get(plan.pool)
            if m is not None and m.plan is not None and (m.plan.id, m.plan.aborting) == (plan.id, plan.aborting):
                yield m, plan

    def _confirmed(self, state) -> None:
        if self.stopped:
            return
        again = False
        for m, plan in self._carried(state):
            m.confirmed = plan.phase
            if plan.phase == HOLD and m.plan.phase == HOLD:
                log.info("pool {pool}: every worker holds the moving keys; moving", pool=m.name)
                m.plan = replace(m.plan, phase=MOVE)
                again = True
            elif plan.phase == MOVE and m.state == HOLDING:
                m.record["state"] = MOVING
                self._run_mover(m)
            self._save(m)
        carried = {plan.pool for plan in state.plans}
        for m in list(self.migrations.values()):
            if m.finishing and m.name not in carried:
                self._finished(m)
        if again:
            self._push()

    def _not_confirmed(self, state, failure) -> None:
        if self.stopped:
            return
        error = failure.getErrorMessage()
        for m, plan in self._carried(state):
            if m.state == HOLDING:
                self._do_pause(m, "the workers did not all take the plan: %s" % (error,))
        for m in self.migrations.values():
            if m.finishing:
                log.error("pool {pool}: the workers did not all take the end of the migration: {error}; trying"
                          " again", pool=m.name, error=error)
                self.reactor.callLater(TICK, self._push)
                return

    def _run_mover(self, m) -> None:
        if self.stopped:
            return
        if m.mover is None:
            if self.mover_class is None:
                from twistedproxy.migration.mover import Mover

                self.mover_class = Mover
            events = _Events(self, m)
            m.mover = events.mover = self.mover_class(self.reactor, m.plan, m.config, events, cursors=m.cursors)
        m.mover.start()
        self._tick_soon()

    def _mover_finished(self, m) -> None:
        """Every server listed, every moving key moved: push the state without the plan."""
        plan = m.plan
        m.cursors = dict(m.mover.cursors)
        m.finishing = True
        m.plan = None
        file_list = self.config.pool(m.name).servers if self.config is not None else plan.target
        m.override = plan.target if file_list != plan.target else None
        m.done_plan = plan
        self._save(m)
        self._push()

    def _finished(self, m) -> None:
        plan = m.done_plan
        m.finishing = False
        m.record["state"] = ABORTED if plan.aborting else DONE
        m.record["finished"] = self.reactor.seconds()
        m.record["eta_seconds"] = None
        log.info("pool {pool}: migration {id} {what}: {moved} keys moved, {skipped} skipped, {failed} failed",
                 pool=m.name, id=plan.id, what="aborted (the old servers are in force)" if plan.aborting else "done",
                 moved=m.record["moved"], skipped=m.record["skipped"], failed=m.record["failed"])
        self._save(m)
        mover, m.mover = m.mover, None
        if not plan.removed:
            mover.stop()
            return
        left = [len(plan.removed)]

        def counted(spec, count, error):
            if error is not None:
                log.error("server {server} of pool {pool}: its keys could not be counted ({error})",
                          server=spec.address, pool=m.name, error=error)
            elif count == 0:
                m.record["drained"].append(spec.address)
                log.info("server {server} of pool {pool} holds none of its keys any more; it can be taken out",
                         server=spec.address, pool=m.name)
            else:
                log.error("server {server} of pool {pool} still holds {count} keys of the pool after its"
                          " migration", server=spec.address, pool=m.name, count=count)
            left[0] -= 1
            if left[0] == 0:
                mover.stop()
                self._save(m)

        for spec in plan.removed:
            mover.count_keys(spec, lambda count, error, spec=spec: counted(spec, count, error))

    # -- what the operator asks ---------------------------------------------------------

    def control(self, action: str, pool=None):
        """
        C{cacheproxyctl migration ACTION [POOL]}: (ok, records or the reason it
        was refused).  Without C{pool}, the action applies to every pool it can.
        """
        if action not in ACTIONS:
            return False, "unknown action %r (expected one of: %s)" % (action, ", ".join(ACTIONS))
        if pool is not None and pool not in self.migrations:
            known = self.config is not None and any(p.name == pool for p in self.config.pools)
            return False, ("pool %s has no migration record" % (pool,) if known else "no pool named %s" % (pool,))
        if action == "status":
            return True, self.records(pool)
        names = [pool] if pool is not None else sorted(self.migrations)
        done, refusals = [], []
        for name in names:
            m = self.migrations[name]
            why = getattr(self, "_" + action)(m) if m.record is not None else "it has no migration"
            if why:
                refusals.append("pool %s: %s" % (name, why))
            else:
                done.append(name)
        if not done:
            return False, "; ".join(refusals) or "no migration to %s" % (action,)
        return True, {name: self._fresh(self.migrations[name]) for name in done}

    def _pause(self, m):
        return self._do_pause(m)

    def _do_pause(self, m, error=None):
        """Pause C{m} (with C{error}: a failure paused it); None, or why it cannot be paused."""
        if m.state != MOVING and not (error and m.state == HOLDING):
            return "nothing to pause (it is %s)" % (m.state,)
        if m.mover is not None:
            m.mover.pause()
        m.record["state"] = PAUSED
        m.record["error"] = error
        if error:
            log.error("pool {pool}: migration paused: {error} (cacheproxyctl migration resume {pool} goes on)",
                      pool=m.name, error=error)
        else:
            log.info("pool {pool}: migration paused", pool=m.name)
        self._save(m)
        return None

    def _resume(self, m):
        if m.state != PAUSED:
            return "nothing to resume (it is %s)" % (m.state,)
        m.record["error"] = None
        log.info("pool {pool}: migration resumed", pool=m.name)
        if m.confirmed != m.plan.phase:
            m.record["state"] = HOLDING
            self._push()
        else:
            m.record["state"] = MOVING
            self._run_mover(m)
        self._save(m)
        return None

    def _abort(self, m):
        if m.plan is None or m.finishing:
            return "nothing to abort (it is %s)" % (m.state,)
        if m.plan.aborting:
            return "its migration is being aborted already"
        if m.mover is not None:
            m.cursors = {}
            m.mover.stop()
            m.mover = None
        log.warn("pool {pool}: migration {id} aborted: moving the keys back to {servers}", pool=m.name,
                 id=m.plan.id, servers=", ".join(_addresses(m.plan.source)))
        self._reverse(m)
        self._save(m)
        self._push()
        return None

    # -- the mover's news, the ticks, the saves -------------------------------------

    def _tick_soon(self) -> None:
        if self._ticker is None and not self.stopped:
            self._ticker = LoopingCall(self._tick)
            self._ticker.clock = self.reactor
            self._ticker.start(TICK, now=False)

    def _tick(self) -> None:
        now = self.reactor.seconds()
        running = False
        for m in self.migrations.values():
            if m.state != MOVING or m.mover is None:
                continue
            running = True
            m.samples.append((now, m.record["moved"] + m.record["skipped"]))
            while m.samples and m.samples[0][0] < now - RATE_WINDOW:
                m.samples.popleft()
            if now - m.saved_at >= SAVE_EVERY:
                self._save(m)
            if now - m.logged_at >= LOG_EVERY:
                m.logged_at = now
                record = self._fresh(m)
                log.info("pool {pool}: migration {id}: {scanned} keys scanned, {moved} moved, {skipped} skipped,"
                         " {failed} failed, {rate} keys/s, {percent}% of the servers listed, eta {eta} s",
                         pool=m.name, id=record["id"], scanned=record["scanned"], moved=record["moved"],
                         skipped=record["skipped"], failed=record["failed"], rate=record["rate"],
                         percent=int(100 * m.fraction()), eta=record["eta_seconds"])
        if not running and self._ticker is not None:
            self._ticker.stop()
            self._ticker = None

    def _save(self, m) -> None:
        if self.stopped:
            return
        m.saved_at = self.reactor.seconds()
        try:
            self.store.save(m.name, m.entry())
        except (OSError, TypeError, ValueError) as e:
            log.error("pool {pool}: the migration state cannot be saved ({error}); a restart would not find it",
                      pool=m.name, error=str(e))


class _ReadOnly:
    """A store seen without changing it (L{check_restart})."""

    def __init__(self, store):
        self.store = store

    def load(self):
        return self.store.load()

    def save(self, pool, entry):
        pass

    def remove(self, pool):
        pass


def check_restart(store, config) -> None:
    """Raise L{MigrationRefused} (or ValueError: an unreadable file) if what C{store} kept contradicts C{config}."""
    from twisted.internet.task import Clock

    Coordinator(Clock(), None, _ReadOnly(store)).restore(config)


class _Events:
    """
    What one mover tells the coordinator about its migration.  A mover that was
    stopped (an abort, a stop) is no longer heard: the batch it had on its way
    fails when its connections close, which is no failure of the migration (an
    abort moves those keys back, a restart lists them again).
    """

    def __init__(self, coordinator, m):
        self.coordinator = coordinator
        self.m = m
        self.mover = None  # the mover these events are of (set once it is made)

    def _current(self) -> bool:
        return self.coordinator.migrations.get(self.m.name) is self.m and self.m.mover is self.mover

    def progress(self, scanned=0, moved=0, skipped=0, failed=0, bytes=0) -> None:
        if not self._current():
            return
        record = self.m.record
        record["scanned"] += scanned
        record["moved"] += moved
        record["skipped"] += skipped
        record["failed"] += failed
        record["bytes"] += bytes

    def failed(self, error) -> None:
        if self._current():
            self.coordinator._do_pause(self.m, error)

    def finished(self) -> None:
        if self._current() and self.m.plan is not None:
            self.coordinator._mover_finished(self.m)
