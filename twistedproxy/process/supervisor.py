"""
Supervision: the master's workers, one per slot, kept running.

  - A worker that dies is respawned at once; one that dies young again and
    again is respawned with a growing delay (crash-loop backoff, L{backoff_delay}).
  - With a spare wanted, one more process is kept started and warmed up
    ahead: it takes the slot of the next worker to die
    (L{twistedproxy.process.spare}).  The first starts with the first
    generation, beside their warm-ups; a later one once every slot's worker
    has been ready for L{SPARE_AFTER} seconds: never in their first traffic.
  - A resize starts the new slots' workers or retires the extra ones.
  - A rollover starts a new generation of workers; the old one keeps serving
    until every worker of the new one is ready, then drains (graceful stop).
  - One L{broadcast} sends a command to the live workers and gathers every
    answer, failed or not.

The supervisor starts nothing itself: a I{spawner}, C{spawn(worker, replacing)},
launches the process for a L{WorkerProcess} (the master's passes it the
listening sockets and the AMP channel; a spare, whose C{slot} is None, gets
its channel only); an I{assigner}, C{assign(worker, slot)}, gives a spare the
slot of a crashed worker (False: the spare is not warm yet; OSError: it
cannot); and the supervisor tells its I{owner} (L{SupervisorEvents}) what
happened.  So it runs on a MemoryReactorClock with a fake spawner, crash-loop
backoff included.
"""

from __future__ import annotations

import signal

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from twistedproxy.process import channel

log = Logger()

KILL_GRACE = 3.0  # seconds past a stop's deadline before SIGKILL
YOUNG = 2.0  # a worker dying within this many seconds of its Ready counts towards a crash loop
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
# Seconds the workers are all ready before a spare starts (its start and warm-up take a
# core for seconds: not while the workers, or a crashed one's replacement, meet their
# first traffic).  The first spare starts with the first generation instead: then its
# start is over by the time the workers are (bench/README.md, "Measured in the thirteenth
# #10 session": started 5 s after them, it was a pause in their traffic on two cores).
SPARE_AFTER = 5.0


def backoff_delay(failures: int) -> float:
    """
    Seconds before respawning a worker that died young C{failures} times in a
    row: at once the first time, then 0.1 s doubling up to 10 s.
    """
    if failures <= 1:
        return 0
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 2))


def exit_reason(reason) -> str:
    """What ended a process, for people: C{reason} is the Failure of C{processEnded}."""
    sig = getattr(reason.value, "signal", None)
    if sig:
        try:
            return "killed by signal %d (%s)" % (sig, signal.Signals(sig).name)
        except ValueError:
            return "killed by signal %d" % (sig,)
    return "exited with code %s" % (getattr(reason.value, "exitCode", None) or 0,)


class SupervisorEvents:
    """What a L{Supervisor} tells its owner; each does nothing here (the master overrides them)."""

    def worker_ready(self, worker) -> None:
        """C{worker} said Ready: it serves."""

    def worker_exited(self, worker) -> None:
        """C{worker}'s process ended (before the supervisor replaces or forgets it)."""

    def worker_retired(self, worker) -> None:
        """A retiring worker (older generation, removed slot) is gone."""

    def generation_ready(self) -> None:
        """Every worker of the newest generation is ready; the older ones were told to drain."""

    def all_stopped(self) -> None:
        """After L{Supervisor.stop}: the last worker is gone."""

    def before_graceful_stop(self, worker):
        """A Deferred the graceful stop of C{worker} waits for (the master collects its counters)."""
        return defer.succeed(None)


class WorkerProcess(ProcessProtocol):
    """
    One spawned worker, seen from the master; the spawner sets C{pid} and
    C{channel}.  A spare has no C{slot} (None) until it takes one.
    """

    def __init__(self, supervisor, slot, generation: int):
        self.supervisor = supervisor
        self.slot = slot
        self.generation = generation
        self.pid = None
        self.state = "starting" if slot is not None else "spare"  # spare, starting, ready, stopping, gone
        self.started_at = supervisor.reactor.seconds()
        self.channel = None
        self.waiting_channel = None  # a spare's: the master's end of its channel, until it takes a slot
        self.hello = False
        self.served = False  # said Ready (the state is "gone" once it ended)
        self.ready_at = None  # when it said Ready (after its warm-up)
        self.kill_call = None

    def processEnded(self, reason):
        self.state = "gone"
        if self.kill_call is not None and self.kill_call.active():
            self.kill_call.cancel()
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.supervisor.worker_ended(self, reason)

    def signal(self, signum) -> None:
        if self.state != "gone" and self.transport is not None:
            try:
                self.transport.signalProcess(signum)
            except Exception:
                pass  # exited meanwhile

    def stop(self, graceful: bool, timeout: float) -> None:
        """Ask the worker to stop; SIGKILL it if still there after C{timeout} + grace."""
        if self.state == "gone":
            return
        self.state = "stopping"
        if graceful and self.channel is not None and self.hello:
            # What the owner needs first (its counters: they outlive it). A lost
            # channel makes the worker stop on its own; kill_call is the backstop.
            d = self.supervisor.owner.before_graceful_stop(self)
            d.addCallback(lambda _: self.channel.callRemote(channel.Stop, graceful=True))
            d.addErrback(lambda _: None)
        else:
            self.signal("TERM")
        if self.kill_call is None:
            delay = (timeout if graceful else 0) + KILL_GRACE
            self.kill_call = self.supervisor.reactor.callLater(delay, self.signal, "KILL")

    def describe(self) -> dict:
        supervisor = self.supervisor
        now = supervisor.reactor.seconds()
        if self.slot is None:
            return {"pid": self.pid, "state": self.state, "uptime": round(now - self.started_at, 3)}
        return {"slot": self.slot, "pid": self.pid, "state": self.state,
                "generation": self.generation, "uptime": round(now - self.started_at, 3),
                "restarts": supervisor.restarts.get(self.slot, 0), "last_exit": supervisor.exits.get(self.slot)}


class Supervisor:
    """
    The workers of one master.

    @ivar workers: slot -> the current L{WorkerProcess} of that slot.
    @ivar retiring: workers of an older generation (or removed slots), stopping.
    @ivar count: the number of slots.
    @ivar shutdown_timeout: seconds a graceful stop may take before SIGKILL
        (C{global.worker_shutdown_timeout}; the owner keeps it current).
    @ivar spare: the spare L{WorkerProcess} (started ahead, no slot yet), or None.
    """

    def __init__(self, reactor, spawn, owner=None, shutdown_timeout: float = 30.0, assign=None):
        self.reactor = reactor
        self.spawner = spawn
        self.assigner = assign
        self.owner = owner if owner is not None else SupervisorEvents()
        self.shutdown_timeout = shutdown_timeout
        self.count = 0
        self.generation = 0
        self.workers = {}
        self.retiring = set()
        self.failures = {}  # slot -> consecutive young deaths
        self.restarts = {}  # slot -> times its worker died unasked and was respawned
        self.exits = {}  # slot -> how the slot's last worker ended (exit_reason), with its pid
        self.respawn_calls = {}  # slot -> pending delayed respawn
        self.rollover_pending = None  # the generation whose readiness retires the previous one
        self.stopping = False
        self.spare_wanted = False
        self.spare = None
        self.spare_failures = 0  # consecutive young deaths of spares
        self.spare_call = None  # a pending delayed start of a spare

    # -- which workers ------------------------------------------------------------

    def all_workers(self) -> list:
        return list(self.workers.values()) + list(self.retiring)

    def live_workers(self) -> list:
        """The workers that answer commands: said hello, not gone."""
        return [w for w in self.all_workers() if w.hello and w.state != "gone"]

    @property
    def settled(self) -> bool:
        """No rollover under way and no worker retiring: the current workers are all there is."""
        return not self.retiring and not self.rollover_pending

    def broadcast(self, command, workers=None, **arguments):
        """
        Send C{command} to C{workers} (default: every live worker); a Deferred
        firing with [(worker, ok, answer or Failure)] in that order, once each
        answered or failed.  It never fails.
        """
        workers = self.live_workers() if workers is None else list(workers)
        calls = []
        for worker in workers:
            try:
                calls.append(worker.channel.callRemote(command, **arguments))
            except Exception:
                calls.append(defer.fail())  # the channel is closing: the worker is on its way out
        d = defer.DeferredList(calls, consumeErrors=True)
        return d.addCallback(lambda results: [(w, ok, answer) for w, (ok, answer) in zip(workers, results)])

    def signal_all(self, signum) -> None:
        for worker in self.all_workers():
            worker.signal(signum)

    # -- the spare -------------------------------------------------------------------

    def want_spare(self, wanted: bool) -> None:
        """
        Keep a spare (C{global.spare_worker}), or stop the one there is.  While
        the first generation starts (none of its workers ready yet), the spare
        starts at once, beside them.
        """
        self.spare_wanted = wanted
        if wanted:
            if self._first_start():
                self._start_spare_now()
            else:
                self._spare_due()
            return
        self._cancel_spare_call()
        if self.spare is not None:
            self.spare.stop(graceful=False, timeout=0)

    def _cancel_spare_call(self) -> None:
        if self.spare_call is not None:
            self.spare_call.cancel()
            self.spare_call = None

    def _spare_missing(self) -> bool:
        """Whether a spare is wanted and missing (none started, none due), and every slot's worker is ready."""
        if (not self.spare_wanted or self.stopping or self.spare is not None or self.spare_call is not None
                or self.assigner is None):
            return False
        return len(self.workers) == self.count and all(w.state == "ready" for w in self.workers.values())

    def _spare_due(self) -> None:
        """A spare missing is started L{SPARE_AFTER} seconds from now."""
        if self._spare_missing():
            self.spare_call = self.reactor.callLater(SPARE_AFTER, self._start_spare)

    def _first_start(self) -> bool:
        """Whether the first generation is starting: none of its workers has been ready yet."""
        return (self.rollover_pending == 1 and not self.stopping
                and not any(worker.served for worker in self.workers.values()))

    def _start_spare_now(self) -> None:
        if self.spare is None and self.assigner is not None:
            self._cancel_spare_call()
            self._spawn_spare()

    def _start_spare(self) -> None:
        self.spare_call = None
        if not self._spare_missing():
            return  # a worker is starting again: its Ready makes it due
        self._spawn_spare()

    def _spawn_spare(self) -> None:
        self.spare = WorkerProcess(self, None, self.generation)
        self.spawner(self.spare, False)
        log.debug("spare worker {pid} started", pid=self.spare.pid)

    def _spare_ended(self, spare: WorkerProcess, reason) -> None:
        """The spare died before taking a slot: another one, later each time it dies young."""
        self.spare = None
        if self.stopping or spare.state == "stopping":
            return
        young = self.reactor.seconds() - spare.started_at < YOUNG
        self.spare_failures = self.spare_failures + 1 if young else 1
        delay = backoff_delay(self.spare_failures)
        log.warn("spare worker {pid} {reason}; another in {delay}s", pid=spare.pid, reason=exit_reason(reason),
                 delay=delay)
        if self.spare_wanted:
            self.spare_call = self.reactor.callLater(SPARE_AFTER + delay, self._start_spare)

    def _take_spare(self, slot: int):
        """
        The spare, given C{slot} of the current generation; None when there is
        none, it is not ready yet (it stays the spare) or it failed to take it.
        """
        spare = self.spare
        if spare is None or spare.state != "spare":
            return None
        try:
            if not self.assigner(spare, slot):
                return None
        except OSError as e:
            log.warn("spare worker {pid} cannot take slot {slot}: {error}", pid=spare.pid, slot=slot, error=str(e))
            self.spare = None
            spare.stop(graceful=False, timeout=0)
            return None
        self.spare = None
        spare.slot = slot
        spare.generation = self.generation
        spare.state = "starting"
        spare.started_at = self.reactor.seconds()
        log.info("spare worker {pid} takes slot {slot}", pid=spare.pid, slot=slot)
        return spare

    # -- generations ---------------------------------------------------------------

    def start(self, count: int) -> None:
        """Start the first generation: C{count} workers."""
        self.rollover(count)

    def rollover(self, count: int) -> None:
        """Start a new generation of C{count} workers; the current ones retire once it is ready."""
        for call in self.respawn_calls.values():
            call.cancel()
        self.respawn_calls = {}
        self.retiring.update(self.workers.values())
        self.workers = {}
        self.count = count
        self.generation += 1
        self.rollover_pending = self.generation
        self.failures = {}
        for slot in range(count):
            self._spawn(slot)

    def resize(self, count: int) -> bool:
        """Run C{count} workers: start the new slots or retire the extra ones; whether anything changed."""
        if count == self.count:
            return False
        old, self.count = self.count, count
        if count > old:
            for slot in range(old, count):
                if slot not in self.workers:
                    self._spawn(slot)
        else:
            for slot in range(count, old):
                call = self.respawn_calls.pop(slot, None)
                if call is not None:
                    call.cancel()
                worker = self.workers.pop(slot, None)
                if worker is not None:
                    self.retiring.add(worker)
                    worker.stop(graceful=True, timeout=self.shutdown_timeout)
        # Their shares of client_connections follow the new count.
        self.broadcast(channel.WorkerCount, count=count)
        log.info("worker count {old} -> {new}", old=old, new=count)
        return True

    # -- one worker's life ------------------------------------------------------------

    def _spawn(self, slot: int, replacing: bool = False) -> WorkerProcess:
        self.respawn_calls.pop(slot, None)
        worker = WorkerProcess(self, slot, self.generation)
        self.spawner(worker, replacing)
        self.workers[slot] = worker
        log.debug("worker {pid} started in slot {slot}", pid=worker.pid, slot=slot)
        return worker

    def worker_ready(self, worker: WorkerProcess) -> None:
        worker.served = True
        worker.ready_at = self.reactor.seconds()
        if worker.state == "starting":
            worker.state = "ready"
        log.debug("worker {pid} ready", pid=worker.pid)
        self.owner.worker_ready(worker)
        self._check_generation_ready()
        self._spare_due()

    def _check_generation_ready(self) -> None:
        if self.rollover_pending is None or self.stopping:
            return
        current = [w for w in self.workers.values() if w.generation == self.rollover_pending]
        if len(current) < self.count or any(w.state != "ready" for w in current):
            return
        self.rollover_pending = None
        for worker in list(self.retiring):
            worker.stop(graceful=True, timeout=self.shutdown_timeout)
        self.owner.generation_ready()

    def worker_ended(self, worker: WorkerProcess, reason) -> None:
        self.owner.worker_exited(worker)
        if worker is self.spare:
            self._spare_ended(worker, reason)
        elif worker in self.retiring:
            self.retiring.discard(worker)
            self.owner.worker_retired(worker)
        elif self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
            self.exits[worker.slot] = {"pid": worker.pid, "reason": exit_reason(reason)}
            if not self.stopping and worker.state != "stopping" and worker.slot < self.count:
                self._respawn_later(worker, reason)
        if self.stopping and self._none_left():
            self.owner.all_stopped()

    def _respawn_later(self, worker, reason) -> None:
        slot = worker.slot
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        # Young: it never served, or served briefly (its warm-up does not count).
        young = not worker.served or self.reactor.seconds() - worker.ready_at < YOUNG
        failures = self.failures.get(slot, 0) + 1 if young else 0
        self.failures[slot] = failures
        self.restarts[slot] = self.restarts.get(slot, 0) + 1
        delay = backoff_delay(failures)
        log.warn("worker {pid} (slot {slot}) exited (code {code}, signal {sig}); respawning in {delay}s",
                 pid=worker.pid, slot=slot, code=code, sig=sig, delay=delay)
        if delay:
            self.respawn_calls[slot] = self.reactor.callLater(delay, self._respawn, slot)
        else:
            self._respawn(slot)

    def _respawn(self, slot) -> None:
        self.respawn_calls.pop(slot, None)
        if not self.stopping and slot not in self.workers and slot < self.count:
            # Connections queued on the crashed worker's socket wait for this one's warm-up
            # (and, without a spare, for its process to start).
            spare = self._take_spare(slot)
            if spare is not None:
                self.workers[slot] = spare
            else:
                self._spawn(slot, replacing=True)

    # -- stop ---------------------------------------------------------------------

    def _none_left(self) -> bool:
        """No worker, retiring worker or spare is left."""
        return not self.workers and not self.retiring and self.spare is None

    def stop(self, graceful: bool = True) -> None:
        """
        Stop every worker (C{graceful}: let them finish in-flight requests) and
        respawn none; the owner hears L{SupervisorEvents.all_stopped} when the
        last is gone.  Again while stopping: a fast stop hurries the workers.
        """
        if self.stopping:
            if not graceful:
                for worker in self.all_workers():
                    worker.stop(graceful=False, timeout=0)
            return
        self.stopping = True
        for call in self.respawn_calls.values():
            call.cancel()
        self.respawn_calls = {}
        self._cancel_spare_call()
        for worker in self.all_workers():
            worker.stop(graceful=graceful, timeout=self.shutdown_timeout)
        if self.spare is not None:
            self.spare.stop(graceful=False, timeout=0)  # it serves nobody
        if self._none_left():
            self.owner.all_stopped()
