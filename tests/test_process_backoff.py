"""
Crash-loop backoff: a worker that keeps dying young (before it served, or
within YOUNG seconds of its Ready) is respawned after 0, 0.1, 0.2, 0.4 ...
seconds (at most 10); one that lived is respawned at once.
The real test kills the worker as soon as it appears and times the respawns
from the master's status (pid and uptime).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.support import processes
from tests.support.workers import Master, master_config, poll
from twistedproxy.process.supervisor import YOUNG, backoff_delay


def test_backoff_schedule():
    delays = [backoff_delay(n) for n in range(1, 12)]
    assert delays == pytest.approx([0, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 10, 10, 10])


def _kill_and_time_respawn(master, timeout=10.0):
    """SIGKILL the only worker; (seconds from the kill to the respawn: at least, at most, the new worker)."""
    (worker,) = master.current_status()["workers"]
    os.kill(worker["pid"], signal.SIGKILL)
    killed = time.time()

    def respawned():
        before = time.time()
        workers = [w for w in master.current_status()["workers"] if w["pid"] != worker["pid"]]
        return workers and (before, time.time(), workers[0])

    before, after, new = poll(respawned, timeout, 0.005, "a respawned worker")
    # The master started it uptime seconds before it answered, between before and after.
    return before - new["uptime"] - killed, after - new["uptime"] - killed + 0.001, new


@pytest.mark.integration
def test_a_worker_dying_young_is_respawned_with_growing_delays(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    pool = processes.pool_config([backend[0].port], port, redis=False)
    master = Master(spawn, master_config({"mc": pool}, worker_processes=1), port)
    slack = 0.5  # death noticed late, status polled late, on a loaded box
    for failures in range(1, 6):
        low, high, _ = _kill_and_time_respawn(master)
        expected = backoff_delay(failures)
        assert high >= expected and low <= expected + slack, (failures, low, high)
    assert "respawning in 0.8s" in master.process.output()

    # One that lived (served for longer than YOUNG: its warm-up does not count) ends the
    # loop: respawned at once.
    master.wait_ready(1)
    time.sleep(YOUNG + 0.2)
    low, high, _ = _kill_and_time_respawn(master)
    assert low <= slack, low
    master.wait_ready(1)
