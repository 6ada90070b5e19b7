"""
The master's statistics with real processes: the stats port and the stats HTTP
endpoint keep answering through a binary upgrade (SIGUSR2), whose new master
carries the old one's counters on, and the counters of a worker that exits (killed, or retired by a smaller worker count) stay in
the totals, while its gauges leave them.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import Master, connect, kill_pid, master_config, pid_alive, poll, served_by, set_get
from tests.test_stats import http_get, read_stats_port

pytestmark = pytest.mark.integration


def _start(spawn, memcached_backends, workers, *extra):
    backend = memcached_backends(1)
    port, stats_port, http_port = free_port(), free_port(), free_port()
    pools = {"mc": processes.pool_config([b.port for b in backend], port, redis=False)}
    config = master_config(pools, worker_processes=workers, stats_http="%s:%d" % (HOST, http_port))
    master = Master(spawn, config, port, extra_args=["-s", str(stats_port), "-a", HOST] + list(extra))
    return master, port, stats_port, http_port


class StatsPoller(threading.Thread):
    """Reads the stats port and /stats.json in turn until L{stop}; keeps every failure."""

    def __init__(self, stats_port, http_port):
        threading.Thread.__init__(self, daemon=True)
        self.stats_port = stats_port
        self.http_port = http_port
        self.running = True
        self.reads = 0
        self.errors = []
        self.pids = []  # the worker pids of the last /stats.json
        self.requests = []  # the server requests counted at each read of the stats port

    def run(self):
        while self.running:
            try:
                doc = read_stats_port(self.stats_port)
                self.requests.append(_requests(doc))
                report = json.loads(http_get(self.http_port, "/stats.json"))
                if doc["service"] != "nutcracker" or "mc" not in doc or "mc" not in report:
                    self.errors.append("incomplete document: %r" % (sorted(doc),))
                self.pids = report["twistedproxy"]["pids"]
                self.reads += 1
            except Exception as e:
                self.errors.append(repr(e))
            time.sleep(0.01)

    def stop(self):
        self.running = False
        self.join(10)


def test_stats_endpoints_answer_through_an_upgrade(spawn, memcached_backends):
    master, port, stats_port, http_port = _start(spawn, memcached_backends, 1)
    old_pid = master.process.pid
    with connect(port) as sock:
        set_get(sock, b"before", b"upgrade")
    poller = StatsPoller(stats_port, http_port)
    poller.start()
    new_pid = None
    try:
        poll(lambda: poller.reads > 3, 10, message="stats reads")
        status = master.upgrade(1)
        new_pid = status["pid"]
        new_workers = [w["pid"] for w in status["workers"]]
        poll(lambda: poller.pids == new_workers, 10, message="stats from the new master's worker")
        reads = poller.reads
        poll(lambda: poller.reads > reads + 3, 10, message="more stats reads")
        poller.stop()
        with connect(port) as sock:
            set_get(sock, b"after", b"upgrade")
        doc = read_stats_port(stats_port)
        metrics = http_get(http_port, "/metrics")
    finally:
        poller.stop()
        if new_pid is not None and new_pid != old_pid:
            kill_pid(new_pid)
    assert new_pid != old_pid
    assert poller.errors == [], poller.errors[:5]
    # The new master carries on the old one's counters: they never went backwards.
    assert poller.requests == sorted(poller.requests), poller.requests
    assert _requests(doc) == 4  # the set and get before the upgrade, and the two after
    assert b"mc" in metrics


def _requests(doc) -> int:
    return sum(s["requests"] for s in doc["mc"].values() if isinstance(s, dict))


def _set_count(http_port) -> int:
    report = json.loads(http_get(http_port, "/stats.json"))
    return report["twistedproxy"]["pools"]["mc"]["commands"]["set"]["total"]["count"]


def test_counters_of_exited_workers_stay_in_the_totals(spawn, memcached_backends):
    # -i 100: the master collects every 100 ms on its own.
    master, port, stats_port, http_port = _start(spawn, memcached_backends, 2, "-i", "100")
    socks = [connect(port) for _ in range(6)]
    for n, sock in enumerate(socks):
        set_get(sock, b"k%d" % n, b"v")
    victim_sock = socks[0]
    victim = served_by(victim_sock)
    before, sets_before = read_stats_port(stats_port), _set_count(http_port)
    assert _requests(before) == 12 and sets_before == 6
    for n in range(10):
        set_get(victim_sock, b"late%d" % n, b"v")
    time.sleep(0.5)  # a few collection ticks: nothing asks for stats in between
    os.kill(victim, signal.SIGKILL)
    poll(lambda: victim not in master.worker_pids(), 5, 0.02, "the victim to be replaced")
    master.wait_ready(2)
    for sock in socks:
        sock.close()
    # Gauges are not kept: the killed worker's client connections leave the total.
    after = poll(lambda: (lambda d: d if d["mc"]["client_connections"] == 0 else None)(read_stats_port(stats_port)),
                 5, 0.05, "no client connections")
    assert _requests(after) == 12 + 20  # the 10 late set+get were collected before the kill
    assert _set_count(http_port) == 16

    # Retired gracefully (fewer workers): its counters stay too.
    with master.control() as ctl:
        ctl.set_workers(1)
    poll(lambda: (lambda s: len(s["workers"]) == 1 and not s["retiring"])(master.current_status()),
         10, 0.05, "one worker left")
    assert _requests(read_stats_port(stats_port)) == 32
    assert _set_count(http_port) == 16


def test_a_reload_moves_the_stats_http_endpoint(spawn, memcached_backends):
    master, port, stats_port, http_port = _start(spawn, memcached_backends, 1)
    assert b'"mc"' in http_get(http_port, "/stats.json")
    moved = free_port()
    config = dict(master.config)
    config["global"] = dict(config["global"], stats_http="%s:%d" % (HOST, moved))
    master.write_config(config)
    with master.control() as client:
        assert client.reload()["ok"] is True

    def answers(port_number):
        try:
            return b'"mc"' in http_get(port_number, "/stats.json")
        except OSError:
            return False

    poll(lambda: answers(moved), 10, message="stats HTTP on the new address")
    poll(lambda: not answers(http_port), 10, message="the old address to close")
    assert read_stats_port(stats_port)["service"] == "nutcracker"  # the stats port stays
    with connect(port) as sock:
        set_get(sock, b"after", b"reload")


def test_counters_carry_on_through_two_upgrades(spawn, memcached_backends):
    master, port, stats_port, http_port = _start(spawn, memcached_backends, 1)
    poller = StatsPoller(stats_port, http_port)
    poller.start()
    pids = [master.process.pid]
    try:
        with connect(port) as sock:
            set_get(sock, b"first", b"master")
        pids.append(master.upgrade(1)["pid"])
        with connect(port) as sock:
            set_get(sock, b"second", b"master")
        os.kill(pids[-1], signal.SIGUSR2)  # the second master is not our child: signal it by pid
        poll(lambda: not pid_alive(pids[-1]), 20, message="the second master to hand over and exit")
        pids.append(master.wait_ready(1)["pid"])
        with connect(port) as sock:
            set_get(sock, b"third", b"master")
        poll(lambda: _requests(read_stats_port(stats_port)) == 6, 10, message="all six requests counted")
        poller.stop()
    finally:
        poller.stop()
        for pid in pids[1:]:
            kill_pid(pid)
    assert len(set(pids)) == 3
    assert poller.errors == [], poller.errors[:5]
    assert poller.requests == sorted(poller.requests), poller.requests
