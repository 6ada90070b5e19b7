"""
What holds for the whole proxy under a master, not per worker: ejection counted
across workers (and readmission together), the client_connections limit.
"""

from __future__ import annotations

import time

import pytest

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import Master, connect, master_config, poll, read_reply, served_by, set_get
from tests.test_stats import read_stats_port

pytestmark = pytest.mark.integration


def one_connection_per_worker(port, workers=2, tries=200):
    """Connections to the proxy at C{port}, one served by each worker: {pid: socket}."""
    by_pid = {}
    extra = []
    for _ in range(tries):
        sock = connect(port)
        pid = served_by(sock)
        if pid in by_pid:
            extra.append(sock)
        else:
            by_pid[pid] = sock
        if len(by_pid) == workers:
            break
    for sock in extra:
        sock.close()
    assert len(by_pid) == workers, "the kernel gave every connection to one worker"
    return by_pid


def get(sock, key=b"k") -> bytes:
    """A get's whole reply: up to END, or the error line."""
    sock.sendall(b"get %s\r\n" % key)
    data = read_reply(sock, b"\r\n")
    while data.startswith(b"VALUE") and not data.endswith(b"END\r\n"):
        data += read_reply(sock, b"\r\n")
    return data


def pool_stats(stats_port):
    doc = read_stats_port(stats_port)
    pool = doc["mc"]
    return pool, pool[next(k for k, v in pool.items() if isinstance(v, dict) and "server_timedout" in v)]


def ejected(worker_stats) -> bool:
    """Whether a worker has the pool's one server out of its placement, from its own stats."""
    (server,) = worker_stats["pools"]["mc"]["servers"].values()
    return bool(server["ejected"])


def test_ejection_counts_failures_across_workers_and_readmits_together(spawn, memcached_backends):
    backend = memcached_backends(1)[0]
    port, stats_port = free_port(), free_port()
    pool = processes.pool_config([backend.port], port, redis=False, timeout=400, auto_eject_hosts=True,
                                 server_failure_limit=3, server_retry_timeout=1500)
    master = Master(spawn, master_config({"mc": pool}), port, extra_args=["-s", str(stats_port), "-a", HOST])
    conns = one_connection_per_worker(port)
    a, b = conns.values()
    for sock in (a, b):
        set_get(sock, b"k", b"v")
    backend.freeze()
    # Three timeouts in all: two seen by one worker, one by the other.
    for sock in (a, b, a):
        assert get(sock).startswith(b"SERVER_ERROR")
    # Every worker ejects it now, and the ejection is counted once; no fourth timeout.
    poll(lambda: all(ejected(w) for w in master.control().stats().values()), 5, 0.1,
         "both workers to eject the server")
    pool_doc, server = pool_stats(stats_port)
    assert pool_doc["server_ejects"] == 1
    assert server["server_timedout"] == 3
    for sock in (a, b):
        assert get(sock).startswith(b"SERVER_ERROR")
    assert pool_stats(stats_port)[1]["server_timedout"] == 3
    # Past the retry period, still frozen: the probe fails, the server stays out,
    # and no client request paid for finding out.
    time.sleep(2.0)
    for sock in (a, b):
        assert get(sock).startswith(b"SERVER_ERROR")
    pool_doc, server = pool_stats(stats_port)
    assert pool_doc["server_ejects"] == 1 and server["server_timedout"] == 3
    backend.thaw()
    # Back together: once one worker serves again, so does the other.
    hit = b"VALUE k 0 1\r\nv\r\nEND\r\n"
    poll(lambda: get(a) == hit, 10, 0.1, "the first worker to readmit the server")
    poll(lambda: get(b) == hit, 1, 0.05, "the other worker to readmit it too")
    pool_doc, server = pool_stats(stats_port)
    assert pool_doc["server_ejects"] == 1 and server["server_timedout"] == 3
    for sock in conns.values():
        sock.close()
    assert master.process.alive()


def test_client_connections_holds_for_the_whole_proxy(spawn, memcached_backends):
    backend = memcached_backends(1)[0]
    port = free_port()
    pool = processes.pool_config([backend.port], port, redis=False, client_connections=11)
    master = Master(spawn, master_config({"mc": pool}), port)
    served = []
    refused = 0
    for _ in range(30):
        sock = connect(port)
        try:
            set_get(sock, b"k", b"v")
            served.append(sock)
        except (ConnectionError, OSError):
            refused += 1
            sock.close()
    # An even split: 6 for the first worker, 5 for the second; with reuseport a
    # worker whose share is full refuses even while the other has room.
    assert len(served) <= 11 and refused >= 19
    by_worker = {}
    for sock in served:
        pid = served_by(sock)
        by_worker[pid] = by_worker.get(pid, 0) + 1
    assert all(count <= 6 for count in by_worker.values()), by_worker
    for sock in served:
        sock.close()
    assert master.process.alive()


class _Channel:
    """The master's end of one worker's channel, as far as ejections use it: what was sent."""

    def __init__(self, probe_ok=True):
        self.sent = []
        self.probe_ok = probe_ok

    def callRemote(self, command, **kwargs):
        from twisted.internet.defer import succeed

        self.sent.append((command.__name__, kwargs.get("state")))
        return succeed({"ok": self.probe_ok}) if command.__name__ == "ProbeServer" else None


class _Worker:
    state = "ready"

    def __init__(self):
        self.channel = _Channel()


class _Master:
    def __init__(self, limit):
        from twisted.internet.testing import MemoryReactorClock

        from twistedproxy.config import config_from_dict

        self.reactor = MemoryReactorClock()
        self.config = config_from_dict({"mc": {
            "listen": "127.0.0.1:1", "servers": ["127.0.0.1:2:1"], "auto_eject_hosts": True,
            "server_failure_limit": limit, "server_retry_timeout": 1000}})
        self.workers = [_Worker(), _Worker()]

    def live_workers(self):
        return self.workers


def test_the_master_counts_failures_across_workers_and_any_reply_resets_the_count():
    from twistedproxy.process.ejection import Ejections

    master = _Master(limit=3)
    ejections = Ejections(master)
    verdicts = lambda: [[s for c, s in w.channel.sent if c == "ServerHealth"] for w in master.workers]
    ejections.failed("mc", "127.0.0.1:2")
    assert verdicts() == [["suspect"], ["suspect"]]  # report your next reply
    ejections.failed("mc", "127.0.0.1:2")
    ejections.recovered("mc", "127.0.0.1:2")  # one worker got a reply: the count starts over
    ejections.failed("mc", "127.0.0.1:2")
    ejections.failed("mc", "127.0.0.1:2")
    assert verdicts() == [["suspect", "suspect"]] * 2
    ejections.failed("mc", "127.0.0.1:2")
    # Every worker ejects it; one counts the ejection, so the summed stats count it once.
    assert verdicts() == [["suspect", "suspect", "ejected"], ["suspect", "suspect", "ejected-uncounted"]]
    ejections.failed("mc", "127.0.0.1:2")  # late failures change nothing
    master.workers[0].channel.probe_ok = False
    master.reactor.advance(1.0)  # one worker probes; it fails: still out
    assert [c for c, _ in master.workers[0].channel.sent].count("ProbeServer") == 1
    assert verdicts() == [["suspect", "suspect", "ejected"], ["suspect", "suspect", "ejected-uncounted"]]
    master.workers[0].channel.probe_ok = True
    master.reactor.advance(1.0)
    assert verdicts() == [["suspect", "suspect", "ejected", "readmitted"],
                          ["suspect", "suspect", "ejected-uncounted", "readmitted"]]
    assert ejections.entries == {}
