"""
Open-file limits with a real process started the way systemd and shells start
it (soft nofile limit 1024): the limit is raised for the configured
connections, and clients past the ceiling are refused with one log line a
second, not lines per client.
"""

from __future__ import annotations

import socket
import sys
import time

import pytest

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import poll

pytestmark = pytest.mark.integration

PROBE = b"version\r\n"


def start(spawn, nofile: str, port: int, backend, global_keys=None):
    config = {"mc": processes.pool_config([backend.port], port, redis=False)}
    if global_keys:
        config["global"] = global_keys
    path = processes.write_config(config)
    argv = ["prlimit", "--nofile=" + nofile, sys.executable, "-m", "twistedproxy.cli", "-c", path]
    return spawn(processes.Process, argv + processes.stats_args(), port, env=processes.proxy_env(), cwd=processes.ROOT)


def open_clients(port: int, count: int) -> list:
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(10)
        sock.connect((HOST, port))
        socks.append(sock)
    return socks


def answered(sock) -> bool:
    try:
        sock.sendall(PROBE)
        data = b""
        while not data.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                return False
            data += chunk
        return data.startswith(b"VERSION ")
    except OSError:
        return False


def test_the_soft_limit_is_raised_for_the_connections(spawn, memcached_backends):
    port = free_port()
    proxy = start(spawn, "1024:20000", port, memcached_backends(1)[0])
    socks = open_clients(port, 3000)
    try:
        missing = sum(1 for sock in socks if not answered(sock))
    finally:
        for sock in socks:
            sock.close()
    assert missing == 0
    output = proxy.output()
    assert "open files limit 20000 (was 1024" in output, output[-2000:]
    assert "EMFILE" not in output


def test_clients_past_the_ceiling_are_refused_with_one_line_a_second(spawn, memcached_backends):
    port = free_port()
    proxy = start(spawn, "200:200", port, memcached_backends(1)[0])
    began = time.time()
    socks = []
    for _ in range(6):  # bursts over about 1.5 s
        socks += open_clients(port, 100)
        time.sleep(0.25)
    try:
        served = sum(1 for sock in socks if answered(sock))
        assert 100 < served < 200

        def refusal_lines():
            lines = [l for l in proxy.output().splitlines() if "new client(s) refused" in l]
            refused = sum(int(l.split(": ")[-1].split()[0]) for l in lines)
            return lines if refused + served >= 550 else None

        # Refusals are logged as they happen, summed up once a second.
        lines = poll(refusal_lines, 10, 0.1, "the refusals to be logged")
        assert len(lines) <= time.time() - began + 2, lines
    finally:
        for sock in socks:
            sock.close()
    output = proxy.output()
    assert "EMFILE" not in output, output[-2000:]
    # Still serving once descriptors are free again.
    sock = poll(lambda: (lambda s: s if answered(s) else s.close())(open_clients(port, 1)[0]), 5, 0.1, "service")
    sock.close()


def test_worker_rlimit_nofile_sets_the_limit_of_every_process(spawn, memcached_backends):
    from tests.support.workers import Master, master_config

    port = free_port()
    pool = processes.pool_config([memcached_backends(1)[0].port], port, redis=False)
    master = Master(spawn, master_config({"mc": pool}, worker_rlimit_nofile=4096), port)
    for pid in [master.process.pid] + sorted(master.worker_pids()):
        with open("/proc/%d/limits" % pid) as f:
            line = next(l for l in f if l.startswith("Max open files"))
        assert line.split()[3] == "4096", (pid, line)
    assert "open files limit 4096" in master.process.output()
