"""
What a reload does to pools, with real processes: a pool the reload leaves as
it was keeps its backend connections; the connections the proxy closes itself
(those of a pool the reload changed) are not counted as server_eof; settings
changed at run time go back to the file's values.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import redis
from twisted.internet.testing import MemoryReactorClock

from tests.support import processes
from tests.support.workers import Master, master_config, poll, set_get
from tests.test_stats import read_stats_port
from twistedproxy import Proxy
from twistedproxy.config import config_from_dict
from twistedproxy.stats import commands as stats_commands

pytestmark = pytest.mark.integration


def stats_of(master) -> dict:
    argv = master.process.argv
    return read_stats_port(int(argv[argv.index("-s") + 1]), timeout=10)


def server_stats(doc: dict, pool: str) -> dict:
    servers = [v for v in doc[pool].values() if isinstance(v, dict)]
    assert len(servers) == 1
    return servers[0]


def proxy_clients(direct) -> list:
    """The ids of the connections to the Redis backend other than C{direct}'s own."""
    own = direct.client_id()
    return sorted(c["id"] for c in direct.client_list() if int(c["id"]) != own)


def memcached_stat(port: int, name: bytes) -> int:
    with socket.create_connection((processes.HOST, port), timeout=5) as sock:
        sock.sendall(b"stats\r\n")
        data = b""
        while not data.endswith(b"END\r\n"):
            data += sock.recv(65536)
    for line in data.split(b"\r\n"):
        if line.startswith(b"STAT %s " % name):
            return int(line.split()[2])
    raise AssertionError(name)


def connections_to(pids, port: int) -> list:
    """
    The local ports of the established TCP connections processes C{pids} hold
    to C{port} on loopback (read from /proc: only the proxy's own connections
    count, whatever else connects to the backend).
    """
    inodes = set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        for fd in os.listdir(fd_dir):
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            fields = line.split()
            local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
            if state == "01" and inode in inodes and int(remote.split(":")[1], 16) == port:
                found.append(int(local.split(":")[1], 16))
    return sorted(found)


def settings(master) -> dict:
    with master.control() as ctl:
        report = json.loads(ctl.call(stats_commands.Tune, changes="{}")["settings"])
    (worker,) = report["workers"]
    return worker["pools"]


def test_a_reload_keeps_the_connections_of_unchanged_pools(spawn, redis_backends, memcached_backends):
    (rb,) = redis_backends(1)
    (mb,) = memcached_backends(1)
    rport, mport = processes.free_port(), processes.free_port()
    pools = {
        "r": processes.pool_config([rb.port], rport, timeout=400),
        "m": processes.pool_config([mb.port], mport, redis=False, timeout=400),
    }
    config = master_config(pools, worker_processes=1)
    master = Master(spawn, config, rport)
    client = redis.Redis(host=processes.HOST, port=rport, socket_timeout=10, protocol=2)
    direct = redis.Redis(host=processes.HOST, port=rb.port, socket_timeout=10, protocol=2)
    assert client.set("k", "before")
    msock = socket.create_connection((processes.HOST, mport), timeout=10)
    set_get(msock, b"k", b"before")
    redis_clients = proxy_clients(direct)
    assert len(redis_clients) == 1
    memcached_total = memcached_stat(mb.port, b"total_connections")
    workers = master.worker_pids()
    (old_connection,) = connections_to(workers, mb.port)

    with master.control() as ctl:
        ctl.call(stats_commands.Tune, changes=json.dumps({"timeout": 250}), pool="r")
    assert settings(master)["r"]["timeout"] == 250

    # Reload a file that changes pool m only.
    pools["m"] = dict(pools["m"], timeout=500)
    master.write_config(dict(config, **pools))
    with master.control() as ctl:
        assert ctl.reload()["ok"] is True

    assert client.get("k") == b"before"
    set_get(msock, b"k", b"after")
    # Pool r: the same backend connection as before the reload.
    assert proxy_clients(direct) == redis_clients
    # Pool m was rebuilt: a new backend connection, and the old one, closed by
    # the proxy once idle, is not a server_eof.
    poll(lambda: memcached_stat(mb.port, b"total_connections") > memcached_total, message="m's new connection")
    # The proxy's own connections (a count of memcached's would see any other client's come and go).
    poll(lambda: len(connections_to(workers, mb.port)) == 1 and old_connection not in connections_to(workers, mb.port),
         message="m's old connection to close")
    doc = stats_of(master)
    assert server_stats(doc, "m")["server_eof"] == 0
    assert server_stats(doc, "m")["server_err"] == 0
    assert server_stats(doc, "r")["server_eof"] == 0
    # A reload re-applies the file: r's run-time timeout is the file's again.
    assert settings(master) == {
        "r": dict(settings(master)["r"], timeout=400),
        "m": dict(settings(master)["m"], timeout=500),
    }
    msock.close()
    client.close()
    direct.close()


def test_reconfigure_keeps_an_unchanged_pool_and_gives_it_the_files_settings_again():
    data = {
        "a": {"listen": "127.0.0.1:22121", "redis": True, "timeout": 400, "servers": ["127.0.0.1:7001:1"]},
        "b": {"listen": "127.0.0.1:22122", "timeout": 400, "servers": ["127.0.0.1:7002:1"]},
    }
    proxy = Proxy(config_from_dict(data), MemoryReactorClock())
    a, b = proxy.pools["a"], proxy.pools["b"]
    proxy.tune({"timeout": 250, "client_max_pending": 10})
    proxy.reconfigure(config_from_dict(dict(data, b=dict(data["b"], timeout=500))))
    assert proxy.pools["a"] is a and proxy.pools["b"] is not b
    assert (a.config.timeout, a.timeout, a.config.client_max_pending) == (400, 0.4, 4096)
    assert b.closing and proxy.pools["b"].config.timeout == 500
