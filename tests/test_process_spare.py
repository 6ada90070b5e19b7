"""
The spare worker with real processes: started once the workers are ready, it
takes the slot of a killed worker (no new process in between) and serves; a
new spare follows; the key switches it on and off on reload; it never
outlives its master.
"""

from __future__ import annotations

import os
import signal

import pytest

from tests.support import processes
from tests.support.workers import Master, connect, master_config, pid_alive, poll, process_title, served_by, set_get

pytestmark = pytest.mark.integration


def memcache_pool(port, backends):
    return processes.pool_config([b.port for b in backends], port, redis=False)


def spare_pid(master, other_than=None) -> int:
    """The pid of the master's spare (a new one if C{other_than} is given), once it is warm."""

    def spare():
        found = master.current_status()["spare"]
        return found["pid"] if found and found["warm"] and found["pid"] != other_than else None

    return poll(spare, 20, 0.05, "a warm spare worker")


def test_a_spare_takes_the_slot_of_a_killed_worker_and_another_spare_follows(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    master = Master(spawn, master_config({"mc": memcache_pool(port, backend)}), port)
    spare = spare_pid(master)
    assert master.current_status()["spare"]["state"] == "spare"  # and warm: it takes the next slot
    poll(lambda: process_title(spare) == "cacheproxy: spare worker process", 20, 0.05, "the spare's title")
    assert spare not in master.worker_pids()

    victim = master.current_status()["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    status = poll(lambda: master.wait_ready(2) if victim not in master.worker_pids() else None, 20, 0.05,
                  "the killed worker's slot served again")
    slot0 = status["workers"][0]
    assert (slot0["slot"], slot0["pid"], slot0["restarts"]) == (0, spare, 1), status
    assert process_title(spare) == "cacheproxy: worker process 0"
    new_spare = spare_pid(master, other_than=spare)

    # Both slots serve (reuseport deals the connections out): the spare's among them.
    served = set()
    for n in range(40):
        with connect(port) as sock:
            set_get(sock, b"spare:%d" % n, b"v%d" % n)
            served.add(served_by(sock))
        if spare in served and len(served) == 2:
            break
    assert served == master.worker_pids() and spare in served

    master.process.stop()
    poll(lambda: not pid_alive(new_spare), 10, 0.05, "the spare to exit with its master")


def test_the_key_switches_the_spare_on_and_off_on_reload(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    config = master_config({"mc": memcache_pool(port, backend)}, worker_processes=1, spare_worker=False)
    master = Master(spawn, config, port)
    assert master.current_status()["spare"] is None
    config["global"]["spare_worker"] = True
    master.write_config(config)
    with master.control() as ctl:
        assert ctl.reload()["ok"]
    spare = spare_pid(master)
    config["global"]["spare_worker"] = False
    master.write_config(config)
    with master.control() as ctl:
        assert ctl.reload()["ok"]
    poll(lambda: not pid_alive(spare), 10, 0.05, "the spare to stop")
    assert master.current_status()["spare"] is None and len(master.worker_pids()) == 1


def test_the_spare_dies_with_a_killed_master(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    master = Master(spawn, master_config({"mc": memcache_pool(port, backend)}, worker_processes=1), port)
    spare = spare_pid(master)
    master.process.kill()
    poll(lambda: not pid_alive(spare), 5, 0.05, "the spare to exit")
