"""The migration coordinator on a clock, with stand-ins for the routing processes and the mover."""

from __future__ import annotations

import json

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from twistedproxy.config import config_from_dict
from twistedproxy.config.migration import HOLD, MOVE
from twistedproxy.migration.coordinator import Coordinator, MigrationRefused
from twistedproxy.migration.state import FileStore, MemoryStore

OLD = ["127.0.0.1:7001:1", "127.0.0.1:7002:1", "127.0.0.1:7003:1"]
NEW = OLD + ["127.0.0.1:7004:1"]


def config(servers, migrate=True, other=("127.0.0.1:7100:1",), **extra):
    pool = {"listen": "127.0.0.1:22121", "redis": True, "servers": list(servers), "migrate": migrate}
    pool.update(extra)
    return config_from_dict({"alpha": pool, "beta": {"listen": "127.0.0.1:22122", "servers": list(other)}})


class Participants:
    """Routing processes that answer when the test says (or at once with C{auto})."""

    def __init__(self, auto=True):
        self.auto = auto
        self.states = []
        self.waiting = []

    def apply(self, state):
        self.states.append(state)
        if self.auto:
            return succeed(None)
        d = Deferred()
        self.waiting.append(d)
        return d


class FakeMover:
    made = []

    def __init__(self, reactor, plan, pool_config, events, cursors=None):
        self.plan, self.events, self.cursors = plan, events, dict(cursors or {})
        self.running = False
        self.stopped = False
        self.counts = []
        self.fraction = 0.5
        FakeMover.made.append(self)

    def start(self):
        self.running = True

    def pause(self):
        self.running = False

    def stop(self):
        self.running, self.stopped = False, True

    def count_keys(self, spec, done):
        self.counts.append((spec, done))


@pytest.fixture
def made():
    FakeMover.made = []
    return FakeMover.made


def coordinator(store=None, participants=None, first=OLD):
    clock = Clock()
    clock.advance(1000)
    c = Coordinator(clock, participants or Participants(), store or MemoryStore(), mover=FakeMover)
    c.restore(config(first))
    c.start()
    return c, clock


def test_a_reload_that_changes_a_migrate_pool_holds_then_moves(made):
    c, clock = coordinator()
    assert c.reload(config(NEW)) == []
    plan = c.state.plan_of("alpha")
    assert plan.phase == HOLD and len(plan.source) == 3 and len(plan.target) == 4
    assert c.records()["alpha"]["state"] == "holding"
    c.reloaded(True)  # every worker took the configuration with the plan: it holds
    assert c.participants.states[-1].plan_of("alpha").phase == MOVE
    record = c.records()["alpha"]
    assert record["state"] == "moving" and record["removed"] == [] and record["target"][-1] == "127.0.0.1:7004"
    assert made[-1].running and made[-1].plan.phase == MOVE
    made[-1].events.progress(scanned=10, moved=3, skipped=1, bytes=30)
    made[-1].events.finished()
    assert c.state.plans == () and c.state.servers == ()
    record = c.records()["alpha"]
    assert (record["state"], record["scanned"], record["moved"], record["skipped"], record["bytes"]) == (
        "done", 10, 3, 1, 30)
    assert record["finished"] is not None


def test_scale_in_checks_the_removed_server_is_empty(made):
    c, clock = coordinator(first=NEW)
    c.reload(config(OLD))
    c.reloaded(True)
    mover = made[-1]
    mover.events.finished()
    [(spec, done)] = mover.counts
    assert spec.address == "127.0.0.1:7004"
    done(0, None)
    assert c.records()["alpha"]["drained"] == ["127.0.0.1:7004"] and mover.stopped


def test_a_pool_without_migrate_reloads_as_always(made):
    c, clock = coordinator()
    assert c.reload(config(NEW, migrate=False)) == []
    assert c.state.plans == () and c.records() == {} and made == []


def test_a_second_change_during_a_migration_is_refused_for_that_pool_only(made):
    c, clock = coordinator()
    c.reload(config(NEW))
    c.reloaded(True)
    refusals = c.reload(config(NEW + ["127.0.0.1:7005:1"], other=("127.0.0.1:7101:1",)))
    assert refusals == ["pool alpha is migrating (from 3 to 4 servers, 50% done): wait until it ends or abort it"
                        " (cacheproxyctl migration abort alpha)"]
    assert len(c.state.plan_of("alpha").target) == 4
    with pytest.raises(MigrationRefused) as caught:
        c.reload(config(NEW, hash="md5"))
    assert "its hash cannot change meanwhile" in str(caught.value)
    # The refused change waits: once done, the pool runs on the plan's target, and the next
    # reload of that file starts the next migration.
    made[-1].events.finished()
    assert [s.address for s in dict(c.state.servers)["alpha"]] == [a.rsplit(":", 1)[0] for a in NEW]
    c.reload(config(NEW + ["127.0.0.1:7005:1"]))
    assert len(c.state.plan_of("alpha").target) == 5 and c.state.servers == ()


def test_pause_resume_and_failures(made):
    c, clock = coordinator()
    assert c.control("pause", "alpha") == (False, "pool alpha has no migration record")
    c.reload(config(NEW))
    c.reloaded(True)
    ok, records = c.control("pause", "alpha")
    assert ok and records["alpha"]["state"] == "paused" and not made[-1].running
    assert c.control("pause", "alpha") == (False, "pool alpha: nothing to pause (it is paused)")
    ok, records = c.control("resume")
    assert ok and records["alpha"]["state"] == "moving" and made[-1].running
    made[-1].events.failed("listing the keys of 127.0.0.1:7002 failed: Connection refused")
    record = c.records()["alpha"]
    assert record["state"] == "paused" and "Connection refused" in record["error"]
    assert c.control("resume", "alpha")[0] and c.records()["alpha"]["error"] is None
    assert c.control("status", "nosuch") == (False, "no pool named nosuch")
    assert c.control("explode", "alpha")[0] is False


def test_abort_holds_then_moves_back_and_keeps_the_old_list(made):
    c, clock = coordinator()
    c.reload(config(NEW))
    c.reloaded(True)
    first = made[-1]
    ok, records = c.control("abort", "alpha")
    assert ok and records["alpha"]["aborting"] and first.stopped
    plan = c.state.plan_of("alpha")
    assert plan.aborting and len(plan.source) == 4 and len(plan.target) == 3
    assert c.participants.states[-1].plan_of("alpha").phase == MOVE  # held (at once here), then moving
    assert c.control("abort", "alpha") == (False, "pool alpha: its migration is being aborted already")
    made[-1].events.finished()
    made[-1].counts[0][1](0, None)
    record = c.records()["alpha"]
    assert record["state"] == "aborted" and record["drained"] == ["127.0.0.1:7004"]
    assert [s.address for s in dict(c.state.servers)["alpha"]] == [a.rsplit(":", 1)[0] for a in OLD]
    # The same file again: the old list stays in force; the old list in the file: the override goes.
    assert c.reload(config(NEW)) == [] and c.state.servers
    c.reload(config(OLD))
    assert c.state.servers == () and c.state.plans == ()


def test_an_aborted_movers_interrupted_batch_is_not_counted(made):
    """Stopping a mover closes its connections: the batch it had out fails, and is no failure of the migration."""
    c, clock = coordinator()
    c.reload(config(NEW))
    c.reloaded(True)
    first = made[-1]
    first.events.progress(scanned=100, moved=20)
    assert c.control("abort", "alpha")[0] and first.stopped
    first.events.progress(scanned=0, moved=0, failed=38)  # its batch, failed as its connections closed
    first.events.failed("moving keys from 127.0.0.1:7001 failed: Connection lost")
    first.events.finished()
    reverse = made[-1]
    assert reverse is not first
    record = c.records()["alpha"]
    assert record["failed"] == 0 and record["error"] is None and record["state"] == "moving"
    reverse.events.progress(scanned=50, moved=10)
    reverse.events.finished()
    reverse.counts[0][1](0, None)
    record = c.records()["alpha"]
    assert (record["state"], record["scanned"], record["moved"], record["failed"]) == ("aborted", 150, 30, 0)


def test_holding_waits_for_every_worker(made):
    participants = Participants(auto=False)
    c, clock = coordinator(participants=participants)
    c.reload(config(NEW))
    c.reloaded(True)  # the configuration push: held
    assert c.records()["alpha"]["state"] == "holding" and made == []
    participants.waiting.pop().callback(None)  # the move phase is pushed and applied
    assert c.records()["alpha"]["state"] == "moving" and made[-1].running


def test_state_files_survive_a_restart(tmp_path, made):
    store = FileStore(str(tmp_path))
    c, clock = coordinator(store=store)
    c.reload(config(NEW))
    c.reloaded(True)
    made[-1].cursors = {"127.0.0.1:7001": "done", "127.0.0.1:7002": "1234"}
    clock.advance(5)
    saved = json.loads((tmp_path / "cacheproxy-migration-alpha.json").read_text())
    assert saved["plan"]["phase"] == MOVE and saved["cursors"]["127.0.0.1:7002"] == "1234"
    c.stop()
    # A new process with the file naming the target: resumes from the cursors, in phase move.
    again = Coordinator(clock, Participants(), store, mover=FakeMover)
    again.restore(config(NEW))
    assert again.state.plan_of("alpha").phase == MOVE
    again.start()
    assert made[-1].cursors["127.0.0.1:7002"] == "1234" and made[-1].running
    again.stop()
    # Naming the source: aborts; naming another list: refuses to start.
    third = Coordinator(clock, Participants(), store, mover=FakeMover)
    third.restore(config(OLD))
    assert third.state.plan_of("alpha").aborting
    assert third.reload(config(OLD)) == []  # the file names what the abort restores: nothing waits
    third.stop()
    with pytest.raises(MigrationRefused) as caught:
        Coordinator(clock, Participants(), store, mover=FakeMover).restore(config(OLD[:2]))
    assert "name one of the two lists" in str(caught.value)


def test_a_restart_while_the_end_was_pushed_finds_it_done(tmp_path, made):
    store = FileStore(str(tmp_path))
    participants = Participants(auto=False)
    c, clock = coordinator(store=store, participants=participants)
    c.reload(config(NEW))
    c.reloaded(True)
    participants.waiting.pop().callback(None)
    made[-1].events.finished()  # the end is being pushed: the process stops before the workers answer
    c.stop()
    again = Coordinator(clock, Participants(), store, mover=FakeMover)
    again.restore(config(NEW))
    assert again.state.plans == () and again.records()["alpha"]["state"] == "done"
