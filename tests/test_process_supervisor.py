"""
The supervisor on a MemoryReactorClock with a fake spawner: spawn, respawn
after a crash, crash-loop backoff (on the fake clock), resize, rollover, stop,
one broadcast that reaches the live workers only, and the spare worker.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from twisted.internet import defer
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure

from twistedproxy.process import channel
from twistedproxy.process.statistics import MasterStats
from twistedproxy.process.supervisor import (
    KILL_GRACE,
    SPARE_AFTER,
    YOUNG,
    Supervisor,
    SupervisorEvents,
    backoff_delay,
)


class FakeChannel:
    """A worker's channel: records commands, answers each with C{answer} (an exception: fails)."""

    transport = None

    def __init__(self):
        self.sent = []
        self.answer = {}

    def callRemote(self, command, **arguments):
        if self.answer is None:
            raise RuntimeError("channel closing")
        self.sent.append((command, arguments))
        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        return defer.succeed(self.answer)


class FakeTransport:
    def __init__(self):
        self.signals = []

    def signalProcess(self, signum):
        self.signals.append(signum)


class FakeSpawner:
    """Starts no process: gives each worker a pid, a transport and a channel that said hello."""

    def __init__(self):
        self.spawned = []  # (slot, generation, replacing)
        self.next_pid = 100

    def __call__(self, worker, replacing):
        self.next_pid += 1
        worker.pid = self.next_pid
        worker.transport = FakeTransport()
        self.spawned.append((worker.slot, worker.generation, replacing))
        if worker.slot is not None:  # a spare gets its channel with its slot
            self.talk(worker)

    def talk(self, worker):
        worker.channel = FakeChannel()
        worker.hello = True


class FakeAssigner:
    """
    Gives a warm spare its slot: records (pid, slot), then its channel says
    hello; C{error} makes it fail, C{cold} makes it not ready yet.
    """

    def __init__(self, spawner):
        self.spawner = spawner
        self.assigned = []
        self.error = None
        self.cold = False

    def __call__(self, worker, slot):
        if self.error is not None:
            raise self.error
        if self.cold:
            return False
        self.assigned.append((worker.pid, slot))
        self.spawner.talk(worker)
        return True


class Owner(SupervisorEvents):
    def __init__(self):
        self.events = []

    def worker_ready(self, worker):
        self.events.append(("ready", worker.pid))

    def worker_exited(self, worker):
        self.events.append(("exited", worker.pid))

    def worker_retired(self, worker):
        self.events.append(("retired", worker.pid))

    def generation_ready(self):
        self.events.append(("generation ready",))

    def all_stopped(self):
        self.events.append(("all stopped",))


def make(count=2, timeout=5.0, spare=False):
    clock = MemoryReactorClock()
    spawner = FakeSpawner()
    owner = Owner()
    supervisor = Supervisor(clock, spawner, owner, shutdown_timeout=timeout, assign=FakeAssigner(spawner))
    supervisor.start(count)
    supervisor.want_spare(spare)
    return supervisor, clock, spawner, owner


def ready_all(supervisor):
    for worker in list(supervisor.workers.values()):
        supervisor.worker_ready(worker)


def crash(worker, code=1):
    worker.processEnded(Failure(ProcessTerminated(exitCode=code)))


def exit_ok(worker):
    worker.processEnded(Failure(ProcessDone(0)))


def sent(worker):
    return [command for command, _ in worker.channel.sent]


def test_start_spawns_one_worker_per_slot_and_the_generation_is_ready_when_all_are():
    supervisor, clock, spawner, owner = make(2)
    assert spawner.spawned == [(0, 1, False), (1, 1, False)]
    first, second = supervisor.workers[0], supervisor.workers[1]
    assert (first.state, first.generation) == ("starting", 1)
    supervisor.worker_ready(first)
    assert owner.events == [("ready", first.pid)] and supervisor.rollover_pending == 1
    supervisor.worker_ready(second)
    assert owner.events[-1] == ("generation ready",) and supervisor.settled
    assert first.describe()["state"] == "ready" and first.describe()["restarts"] == 0


def test_a_worker_that_served_and_crashed_is_respawned_at_once():
    supervisor, clock, spawner, owner = make(1)
    worker = supervisor.workers[0]
    supervisor.worker_ready(worker)
    clock.advance(YOUNG + 1)  # it lived: not a crash loop
    crash(worker, code=3)
    replacement = supervisor.workers[0]
    assert replacement is not worker and spawner.spawned[-1] == (0, 1, True)
    assert supervisor.restarts == {0: 1} and supervisor.failures == {0: 0}
    assert supervisor.exits[0] == {"pid": worker.pid, "reason": "exited with code 3"}
    assert ("exited", worker.pid) in owner.events
    assert replacement.describe()["last_exit"]["pid"] == worker.pid


def test_a_crash_loop_backs_off_on_the_clock():
    supervisor, clock, spawner, owner = make(1)
    delays = []
    for failures in range(1, 8):
        crash(supervisor.workers[0])  # dies before it ever served: young
        delay = backoff_delay(failures)
        delays.append(delay)
        if delay:
            assert 0 not in supervisor.workers  # not before its delay
            clock.advance(delay * 0.99)
            assert 0 not in supervisor.workers
            clock.advance(delay * 0.01 + 1e-9)
        assert 0 in supervisor.workers, failures
    assert delays == pytest.approx([0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2])
    assert supervisor.restarts == {0: 7} and len(spawner.spawned) == 8
    # One that served long enough starts the count over: respawned at once.
    worker = supervisor.workers[0]
    supervisor.worker_ready(worker)
    clock.advance(YOUNG)
    crash(worker)
    assert supervisor.failures[0] == 0 and supervisor.workers[0] is not worker
    # A worker dying young right after its Ready counts again.
    worker = supervisor.workers[0]
    supervisor.worker_ready(worker)
    crash(worker)
    crash(supervisor.workers[0])
    assert supervisor.failures[0] == 2 and 0 not in supervisor.workers
    clock.advance(backoff_delay(2))
    assert 0 in supervisor.workers


def test_resize_up_spawns_and_down_retires_gracefully_without_respawn():
    supervisor, clock, spawner, owner = make(2)
    for worker in list(supervisor.workers.values()):
        supervisor.worker_ready(worker)
    assert supervisor.resize(2) is False
    assert supervisor.resize(3) is True
    assert spawner.spawned[-1] == (2, 1, False) and supervisor.count == 3
    # Every live worker learns the count (its share of client_connections).
    assert all((channel.WorkerCount, {"count": 3}) in w.channel.sent for w in supervisor.workers.values())
    extra = [supervisor.workers[1], supervisor.workers[2]]
    assert supervisor.resize(1) is True
    assert sorted(supervisor.workers) == [0] and set(extra) == supervisor.retiring
    assert all(w.state == "stopping" and channel.Stop in sent(w) for w in extra)
    assert not supervisor.settled
    for worker in extra:
        exit_ok(worker)
    assert sorted(supervisor.workers) == [0] and not supervisor.retiring and supervisor.settled
    assert [e for e in owner.events if e[0] == "retired"] == [("retired", w.pid) for w in extra]
    assert len(spawner.spawned) == 3  # nothing respawned


def test_a_slot_removed_while_its_respawn_waits_is_not_respawned():
    supervisor, clock, spawner, owner = make(2)
    crash(supervisor.workers[1])
    crash(supervisor.workers[1])  # young twice: respawn waits 0.1 s
    assert 1 not in supervisor.workers
    supervisor.resize(1)
    clock.advance(10)
    assert 1 not in supervisor.workers and len(spawner.spawned) == 3


def test_rollover_starts_a_generation_and_retires_the_old_one_once_it_is_ready():
    supervisor, clock, spawner, owner = make(2)
    old = list(supervisor.workers.values())
    for worker in old:
        supervisor.worker_ready(worker)
    supervisor.rollover(2)
    assert supervisor.generation == 2 and spawner.spawned[-2:] == [(0, 2, False), (1, 2, False)]
    assert set(old) == supervisor.retiring
    new = list(supervisor.workers.values())
    supervisor.worker_ready(new[0])
    # The old generation serves until every new worker is ready.
    assert all(w.state == "ready" and channel.Stop not in sent(w) for w in old)
    supervisor.worker_ready(new[1])
    assert all(w.state == "stopping" and channel.Stop in sent(w) for w in old)
    assert owner.events[-1] == ("generation ready",)
    crash(old[0])  # an old worker's end is no crash to answer
    exit_ok(old[1])
    assert supervisor.workers == {0: new[0], 1: new[1]} and supervisor.restarts == {}
    assert supervisor.settled


def test_broadcast_reaches_the_live_workers_only_and_reports_every_answer():
    supervisor, clock, spawner, owner = make(4)
    workers = [supervisor.workers[slot] for slot in range(4)]
    workers[1].hello = False  # not talking yet
    workers[2].channel.answer = ConnectionError("lost")
    workers[3].channel.answer = None  # its channel is closing: callRemote raises
    exit_ok(workers[0])  # gone (and respawned: the new one is live)
    replacement = supervisor.workers[0]
    results = []
    supervisor.broadcast(channel.Ping).addCallback(results.append)
    (answers,) = results
    outcomes = {w: (ok, answer) for w, ok, answer in answers}
    assert {w: ok for w, (ok, _) in outcomes.items()} == {replacement: True, workers[2]: False, workers[3]: False}
    assert outcomes[workers[2]][1].getErrorMessage() == "lost"
    assert sent(workers[0]) == [] and sent(workers[1]) == []


def test_the_periodic_stats_collection_asks_the_workers_one_after_another():
    """
    A worker pauses its traffic while it takes its snapshot: the master's
    collection every -i ms asks the next worker only once the one before answered.
    """
    supervisor, clock, spawner, owner = make(2)
    ready_all(supervisor)
    asked = []  # (worker, its answer to come)

    def call_remote(worker):
        def call(command, **arguments):
            asked.append((worker, defer.Deferred()))
            return asked[-1][1]

        return call

    for worker in supervisor.workers.values():
        worker.channel.callRemote = call_remote(worker)
    stats = MasterStats(SimpleNamespace(supervisor=supervisor), clock)
    stats.start_loop(30.0)
    clock.advance(30.0)
    first, second = supervisor.workers[0], supervisor.workers[1]
    assert [worker for worker, _ in asked] == [first]
    asked[0][1].callback({"stats": json.dumps({"slot": 0})})
    assert [worker for worker, _ in asked] == [first, second]
    asked[1][1].callback({"stats": json.dumps({"slot": 1})})
    assert stats.totals.last == {first.pid: {"slot": 0}, second.pid: {"slot": 1}}


def test_stop_respawns_nothing_and_kills_what_outlives_its_deadline():
    supervisor, clock, spawner, owner = make(2, timeout=5.0)
    first, second = supervisor.workers[0], supervisor.workers[1]
    supervisor.worker_ready(first)
    crash(second)
    crash(supervisor.workers[1])  # a respawn waits: the stop cancels it
    supervisor.stop(graceful=True)
    assert channel.Stop in sent(first) and first.state == "stopping"
    clock.advance(5.0 + KILL_GRACE)
    assert first.transport.signals == ["KILL"]
    assert ("all stopped",) not in owner.events
    crash(first, code=9)
    assert ("all stopped",) in owner.events and supervisor.workers == {} and len(spawner.spawned) == 3


def test_the_first_spare_starts_with_the_first_generation_and_takes_a_crashed_workers_slot():
    supervisor, clock, spawner, owner = make(2, spare=True)
    # Beside the workers' own start and warm-up, over by the time they serve.
    spare = supervisor.spare
    assert spawner.spawned == [(0, 1, False), (1, 1, False), (None, 1, False)]
    assert spare.describe() == {"pid": spare.pid, "state": "spare", "uptime": 0.0}
    assert supervisor.live_workers() == list(supervisor.workers.values())  # commands skip it
    ready_all(supervisor)
    clock.advance(SPARE_AFTER * 2)
    assert supervisor.spare is spare and len(spawner.spawned) == 3  # no second one
    clock.advance(YOUNG)
    crashed = supervisor.workers[1]
    crash(crashed)
    # No process started: the spare is the slot's worker.
    assert supervisor.workers[1] is spare and supervisor.spare is None
    assert supervisor.assigner.assigned == [(spare.pid, 1)] and len(spawner.spawned) == 3
    assert (spare.slot, spare.state, spare.generation, spare.hello) == (1, "starting", 1, True)
    assert supervisor.restarts == {1: 1} and supervisor.exits[1]["pid"] == crashed.pid


def test_a_later_spare_starts_once_every_worker_has_been_ready_a_while():
    supervisor, clock, spawner, owner = make(2, spare=True)
    ready_all(supervisor)
    clock.advance(YOUNG)
    spare = supervisor.spare
    crash(supervisor.workers[1])
    assert supervisor.workers[1] is spare and supervisor.spare is None
    # Not while the replacement warms up, nor in its first traffic.
    clock.advance(SPARE_AFTER)
    assert supervisor.spare is None
    supervisor.worker_ready(spare)
    clock.advance(SPARE_AFTER * 0.99)
    assert supervisor.spare is None
    clock.advance(SPARE_AFTER * 0.01)
    assert spawner.spawned[-1] == (None, 1, False) and supervisor.spare is not None


def test_no_spare_with_a_later_generation_or_once_the_first_has_served():
    """Only the first generation's start brings the spare along: later, it waits for the workers' ready."""
    supervisor, clock, spawner, owner = make(1)
    supervisor.worker_ready(supervisor.workers[0])
    supervisor.want_spare(True)  # a reload that switches it on, the workers serving
    assert supervisor.spare is None
    clock.advance(SPARE_AFTER)
    assert supervisor.spare is not None


def test_a_spare_due_while_a_worker_starts_again_waits_for_its_ready():
    supervisor, clock, spawner, owner = make(1)
    ready_all(supervisor)
    supervisor.want_spare(True)  # due SPARE_AFTER from now
    clock.advance(SPARE_AFTER / 2)
    crash(supervisor.workers[0])  # a new process: no spare yet
    clock.advance(SPARE_AFTER)
    assert supervisor.spare is None and len(spawner.spawned) == 2
    supervisor.worker_ready(supervisor.workers[0])
    clock.advance(SPARE_AFTER)
    assert supervisor.spare is not None


def ready_with_spare(supervisor, clock):
    ready_all(supervisor)
    clock.advance(SPARE_AFTER)
    assert supervisor.spare is not None
    return supervisor.spare


def test_without_a_spare_a_crashed_worker_is_replaced_by_a_new_process():
    supervisor, clock, spawner, owner = make(1, spare=True)
    ready_with_spare(supervisor, clock).state = "stopping"  # on its way out: not taken
    crash(supervisor.workers[0])
    assert spawner.spawned[-1] == (0, 1, True) and supervisor.assigner.assigned == []


def test_a_spare_still_warming_up_stays_the_spare_and_a_new_process_takes_the_slot():
    supervisor, clock, spawner, owner = make(1, spare=True)
    spare = ready_with_spare(supervisor, clock)
    supervisor.assigner.cold = True
    crash(supervisor.workers[0])
    assert spawner.spawned[-1] == (0, 1, True) and supervisor.spare is spare and spare.state == "spare"
    supervisor.assigner.cold = False
    supervisor.worker_ready(supervisor.workers[0])
    clock.advance(YOUNG)
    crash(supervisor.workers[0])
    assert supervisor.workers[0] is spare and supervisor.assigner.assigned == [(spare.pid, 0)]


def test_a_spare_that_cannot_take_the_slot_is_stopped_and_a_process_started():
    supervisor, clock, spawner, owner = make(1, spare=True)
    spare = ready_with_spare(supervisor, clock)
    supervisor.assigner.error = BrokenPipeError("gone")
    crash(supervisor.workers[0])
    assert spawner.spawned[-1] == (0, 1, True) and supervisor.workers[0] is not spare
    assert spare.state == "stopping" and spare.transport.signals == ["TERM"] and supervisor.spare is None
    exit_ok(spare)
    assert supervisor.workers[0].slot == 0 and 0 in supervisor.workers  # its end changes nothing


def test_a_dead_spare_is_replaced_later_each_time_it_dies_young():
    supervisor, clock, spawner, owner = make(1, spare=True)
    ready_with_spare(supervisor, clock)
    for failures in range(1, 5):
        spare = supervisor.spare
        crash(spare)
        assert ("exited", spare.pid) in owner.events and supervisor.spare is None
        delay = SPARE_AFTER + backoff_delay(failures)
        clock.advance(delay * 0.99)
        assert supervisor.spare is None
        clock.advance(delay * 0.01 + 1e-9)
        assert supervisor.spare is not None and supervisor.spare is not spare
    assert supervisor.spare_failures == 4 and supervisor.restarts == {}
    clock.advance(YOUNG)
    crash(supervisor.spare)  # lived: no backoff
    clock.advance(SPARE_AFTER)
    assert supervisor.spare is not None and supervisor.spare_failures == 1


def test_no_spare_once_unwanted_and_stop_ends_it():
    supervisor, clock, spawner, owner = make(1, spare=True)
    spare = ready_with_spare(supervisor, clock)
    supervisor.want_spare(False)
    assert spare.transport.signals == ["TERM"]
    exit_ok(spare)
    assert supervisor.spare is None
    clock.advance(60)
    assert supervisor.spare is None and len(spawner.spawned) == 2
    supervisor.want_spare(True)
    clock.advance(SPARE_AFTER)
    spare = supervisor.spare
    supervisor.stop(graceful=True)
    assert spare.transport.signals == ["TERM"] and channel.Stop in sent(supervisor.workers[0])
    exit_ok(supervisor.workers[0])
    assert ("all stopped",) not in owner.events  # the spare is not gone yet
    exit_ok(spare)
    assert ("all stopped",) in owner.events and len(spawner.spawned) == 3
