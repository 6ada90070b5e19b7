"""
Clients handed from the workers a reload or an upgrade replaces to the new
ones (process/handoff.py), with real processes: pipelining clients see no
error and no EOF, keep their connection and their state (Redis AUTH, bytes of
a request cut in two); a client of a listen address the reload removed is
closed once its replies are out.
"""

from __future__ import annotations

import signal
import socket
import tempfile
import threading
import time

import pytest

from tests.support import processes
from tests.support.workers import (
    Master,
    connect,
    master_config,
    pid_alive,
    poll,
    read_reply,
    served_by,
    set_get,
    stop_new_masters,
)

pytestmark = pytest.mark.integration

CLIENTS = 40
BATCH = 10


class Pipeliners(threading.Thread):
    """
    C{CLIENTS} memcached-protocol connections, each sending batches of
    C{BATCH} set+get pairs in one write and checking every reply, round-robin
    until L{stop}.  Never reconnects: an error or EOF is kept and that client stops.
    """

    def __init__(self, port: int):
        threading.Thread.__init__(self, daemon=True)
        self.socks = [connect(port) for _ in range(CLIENTS)]
        self.ports = [s.getsockname()[1] for s in self.socks]
        self.pids_before = {served_by(s) for s in self.socks}
        self.errors = []
        self.batches = 0
        self.running = True
        self.dead = set()

    def run(self):
        n = 0
        while self.running:
            n += 1
            for i, sock in enumerate(self.socks):
                if i in self.dead:
                    continue
                keys = [b"c%d-%d-%d" % (i, n, j) for j in range(BATCH)]
                request = b"".join(b"set %s 0 0 %d\r\n%s\r\nget %s\r\n" % (k, len(k), k, k) for k in keys)
                expected = b"".join(b"STORED\r\nVALUE %s 0 %d\r\n%s\r\nEND\r\n" % (k, len(k), k) for k in keys)
                try:
                    sock.sendall(request)
                    reply = b""
                    while len(reply) < len(expected):
                        chunk = sock.recv(65536)
                        if not chunk:
                            raise ConnectionError("EOF after %d of %d bytes" % (len(reply), len(expected)))
                        reply += chunk
                    if reply != expected:
                        raise AssertionError("wrong reply %r" % (reply[:100],))
                except Exception as e:
                    self.errors.append((i, repr(e)))
                    self.dead.add(i)
            self.batches += 1

    def stop(self):
        self.running = False
        self.join(20)
        assert not self.is_alive()


def pool(port, backends, **keys):
    return processes.pool_config([b.port for b in backends], port, redis=False, **keys)


def run_through(master, clients, change) -> set:
    """Traffic from C{clients} through C{change()}; the pids of the workers that served before."""
    old = master.worker_pids()
    clients.start()
    try:
        poll(lambda: clients.batches > 3, 20, message="pipelined traffic")
        change()
        poll(lambda: all(not pid_alive(pid) for pid in old), 60, 0.05, "the old workers to exit")
        done = clients.batches
        poll(lambda: clients.batches > done + 3, 20, message="traffic after the change")
    finally:
        clients.stop()
    return old


def check_moved(clients, old_pids, new_pids) -> None:
    assert clients.errors == [], clients.errors[:5]
    assert clients.pids_before <= old_pids
    for sock, port in zip(clients.socks, clients.ports):
        assert sock.getsockname()[1] == port
        assert served_by(sock) in new_pids  # the same connection, now served by a new worker
        sock.close()


def test_reload_that_replaces_workers_hands_pipelining_clients_over(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    config = master_config({"mc": pool(port, backend)}, tcp_quickack=False)
    master = Master(spawn, config, port)
    clients = Pipeliners(port)

    def reload():
        config["global"]["tcp_quickack"] = True  # a worker start-up setting: the workers roll over
        master.write_config(config)
        master.signal(signal.SIGHUP)

    old = run_through(master, clients, reload)
    new = master.worker_pids()
    assert not old & new
    check_moved(clients, old, new)


def test_upgrade_hands_pipelining_clients_to_the_new_masters_workers(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    master = Master(spawn, master_config({"mc": pool(port, backend)}), port)
    old_master = master.process.pid
    clients = Pipeliners(port)
    new_master = []

    def upgrade():
        # Master.upgrade with room for a loaded machine (a PyPy master starts slowly).
        master.signal(signal.SIGUSR2)
        poll(lambda: not master.process.alive(), 60, 0.05, "the old master to exit")
        new_master.append(master.wait_ready(2, timeout=60)["pid"])

    try:
        old = run_through(master, clients, upgrade)
        assert new_master[0] != old_master
        check_moved(clients, old, master.worker_pids())
    finally:
        stop_new_masters(master.path, old_master)


def test_redis_auth_and_a_half_sent_request_survive_the_handoff(spawn, redis_backends):
    backend = redis_backends(1)
    port = processes.free_port()
    config = master_config({"r": processes.pool_config([backend[0].port], port, redis_auth="secret")},
                           tcp_quickack=False)
    master = Master(spawn, config, port)
    authed, anonymous = connect(port), connect(port)
    authed.sendall(b"AUTH secret\r\nSET k v\r\n")
    assert read_reply(authed, b"+OK\r\n+OK\r\n") == b"+OK\r\n+OK\r\n"
    anonymous.sendall(b"GET k\r\n")
    assert read_reply(anonymous, b"\r\n").startswith(b"-NOAUTH")
    before = (authed.getsockname(), anonymous.getsockname())
    authed.sendall(b"*2\r\n$3\r\nGET\r\n$1")  # cut inside the frame: carried over as unparsed bytes
    time.sleep(0.2)
    old = master.worker_pids()
    config["global"]["tcp_quickack"] = True
    master.write_config(config)
    master.signal(signal.SIGHUP)
    poll(lambda: all(not pid_alive(pid) for pid in old), 60, 0.05, "the old workers to exit")
    authed.sendall(b"\r\nk\r\n")
    assert read_reply(authed, b"v\r\n") == b"$1\r\nv\r\n"
    anonymous.sendall(b"GET k\r\n")
    assert read_reply(anonymous, b"\r\n").startswith(b"-NOAUTH")
    assert (authed.getsockname(), anonymous.getsockname()) == before
    authed.close()
    anonymous.close()


def test_a_tenant_users_login_survives_the_handoff(spawn, redis_backends):
    first, second = redis_backends(2)
    port = processes.free_port()
    config = master_config({
        "pa": {"redis": True, "servers": ["%s:%d:1" % (processes.HOST, first.port)]},
        "pb": {"redis": True, "servers": ["%s:%d:1" % (processes.HOST, second.port)]},
        "front": {"listen": "%s:%d" % (processes.HOST, port), "redis": True, "tenants": {
            "acme": {"users": {"alice": "wonder"}, "route": "pa"},
            "globex": {"users": {"bob": "builder"}, "route": "pb"}}},
    }, tcp_quickack=False)
    master = Master(spawn, config, port)
    alice, anonymous = connect(port), connect(port)
    alice.sendall(b"AUTH alice wonder\r\nSET k a\r\n")
    assert read_reply(alice, b"+OK\r\n+OK\r\n") == b"+OK\r\n+OK\r\n"
    anonymous.sendall(b"GET k\r\n")
    assert read_reply(anonymous, b"\r\n").startswith(b"-NOAUTH")
    old = master.worker_pids()
    config["global"]["tcp_quickack"] = True
    master.write_config(config)
    master.signal(signal.SIGHUP)
    poll(lambda: all(not pid_alive(pid) for pid in old), 60, 0.05, "the old workers to exit")
    alice.sendall(b"GET k\r\n")  # still alice, on a new worker (the old ones are gone): her tenant's pool
    assert read_reply(alice, b"a\r\n") == b"$1\r\na\r\n"
    anonymous.sendall(b"GET k\r\n")
    assert read_reply(anonymous, b"\r\n").startswith(b"-NOAUTH")
    alice.close()
    anonymous.close()


def test_a_removed_listen_address_closes_its_clients_after_their_replies(spawn, memcached_backends):
    kept_backend, slow_backend = memcached_backends(2)
    port, removed = processes.free_port(), processes.free_port()
    config = master_config({"mc": pool(port, [kept_backend]), "gone": pool(removed, [slow_backend])})
    master = Master(spawn, config, port)
    staying, leaving = connect(port, timeout=20), connect(removed, timeout=20)
    staying_pid = served_by(staying)
    served_by(leaving)
    old = master.worker_pids()
    slow_backend.freeze()
    try:
        leaving.sendall(b"set x 0 0 1\r\n1\r\n")  # in flight while the workers roll over
        time.sleep(0.2)
        del config["gone"]
        master.write_config(config)
        master.signal(signal.SIGHUP)
        master.wait_ready(2, timeout=60, generation=2)
        time.sleep(0.5)
    finally:
        slow_backend.thaw()
    assert read_reply(leaving, b"\r\n") == b"STORED\r\n"
    assert leaving.recv(100) == b""  # then closed
    poll(lambda: all(not pid_alive(pid) for pid in old), 60, 0.05, "the old workers to exit")
    assert served_by(staying) != staying_pid  # handed over, not closed
    staying.close()
    leaving.close()


def test_a_unix_socket_client_is_handed_over_too(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    path = tempfile.mktemp(prefix="tp-handoff-", suffix=".sock")
    unix_pool = dict(pool(port, backend), listen=path)
    config = master_config({"mc": pool(port, backend), "local": unix_pool}, tcp_quickack=False)
    master = Master(spawn, config, port)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(path)
    set_get(sock, b"u", b"1")
    before = served_by(sock)
    old = master.worker_pids()
    config["global"]["tcp_quickack"] = True
    master.write_config(config)
    master.signal(signal.SIGHUP)
    poll(lambda: all(not pid_alive(pid) for pid in old), 60, 0.05, "the old workers to exit")
    set_get(sock, b"u", b"2")
    assert before in old and served_by(sock) in master.worker_pids()
    sock.close()
