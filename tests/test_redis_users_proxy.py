"""
Redis users end to end: the proxy's answers before and after a login compared
byte for byte with a real redis-server 7 that has the same ACL users; a
tenant's user kept to its own tenant's keys whatever their prefix (redis-py);
a read-only user; the backend's ACL user (redis_auth_user) against a real
server with ACL users; the proxy's write commands checked against the real
server's command flags; and failed logins rate limited across two workers of
`twistd -n cacheproxy`, including a worker respawned meanwhile.
"""

from __future__ import annotations

import os
import signal
import socket

import pytest
import redis

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.resp import cmd, read_reply
from tests.support.workers import master_config, poll, ready_status
from twistedproxy.control.client import BlockingControlClient
from twistedproxy.protocols import redis_commands

pytestmark = pytest.mark.integration

TOO_MANY = b"-WRONGPASS too many failed authentication attempts from this address; try again later\r\n"


def exchange(port: int, data: bytes) -> bytes:
    """Send C{data} (ending with QUIT) and read until the server closes."""
    with socket.create_connection((HOST, port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def acl_redis(spawn, *users):
    """A redis-server whose default user needs a password nobody here knows, with C{users} (ACL rules)."""
    extra = ["--requirepass", "not-for-clients"]
    for rules in users:
        extra += ["--user"] + rules.split()
    return spawn(processes.redis_server, None, *extra)


def users_front(spawn, backend_port: int, tenants: dict, **glob):
    port = free_port()
    config = {
        "pa": {"redis": True, "servers": ["%s:%d:1" % (HOST, backend_port)],
               "redis_auth": "apppw", "redis_auth_user": "app"},
        "front": {"listen": "%s:%d" % (HOST, port), "redis": True, "tenants": tenants},
    }
    if glob:
        config["global"] = glob
    return spawn(processes.proxy, config, port), port


def test_before_and_after_a_login_the_proxy_answers_as_redis_7_does(spawn):
    real = acl_redis(spawn, "app on >apppw ~* +@all", "alice on >wonder ~* +@all",
                     "reader on >ro ~* +@all -@write")
    proc, port = users_front(spawn, real.port, {
        "acme": {"users": {"alice": "wonder", "reader": {"password": "ro", "read_only": True}}, "route": "pa"},
    })
    before = (cmd("GET", "k") + cmd("SET", "k", "v") + cmd("MGET", "a", "b") + cmd("PING") + cmd("ECHO", "x")
              + cmd("HELLO", "3") + cmd("HELLO", "2", "AUTH", "alice") + cmd("HELLO", "2", "AUTH", "alice", "bad")
              + cmd("AUTH", "alice", "bad") + cmd("AUTH", "nobody", "bad") + cmd("AUTH", "bad") + cmd("DEL", "k")
              + cmd("AUTH") + cmd("HELLO", "3", "SETNAME") + cmd("HELLO", "3", "FOO")
              + cmd("HELLO", "3", "auth", "alice", "bad", "SETNAME") + cmd("HELLO", "x") + cmd("HELLO", "4")
              + b"GET k\r\n" + cmd("QUIT"))
    assert exchange(port, before) == exchange(real.port, before)
    login = cmd("AUTH", "alice", "wonder") + cmd("SET", "k", "v") + cmd("GET", "k") + cmd("DEL", "k") + cmd("QUIT")
    assert exchange(port, login) == exchange(real.port, login) == b"+OK\r\n+OK\r\n$1\r\nv\r\n:1\r\n+OK\r\n"
    hello = (cmd("HELLO", "2", "AUTH", "alice", "wonder", "SETNAME", "x", "AUTH", "alice", "bad") + cmd("GET", "k")
             + cmd("HELLO", "2", "AUTH", "alice", "wonder") + cmd("GET", "k") + cmd("QUIT"))
    proxied, direct = exchange(port, hello), exchange(real.port, hello)
    wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    # The first AUTH logged in before the second failed (Redis 7.0 reads HELLO's options in order).
    assert proxied.startswith(wrongpass + b"$-1\r\n") and direct.startswith(wrongpass + b"$-1\r\n")
    assert proxied.endswith(b"$-1\r\n+OK\r\n") and direct.endswith(b"$-1\r\n+OK\r\n")
    read_only = (cmd("AUTH", "reader", "ro") + cmd("GET", "k") + cmd("SET", "k", "v") + cmd("DEL", "k", "j")
                 + cmd("INCR", "n") + cmd("HSET", "h", "f", "v") + cmd("EXPIRE", "k", "10") + cmd("MSET", "a", "1")
                 + cmd("MGET", "a", "b") + cmd("QUIT"))
    assert exchange(port, read_only) == exchange(real.port, read_only)
    assert proc.alive()


def test_a_tenants_user_reaches_only_its_tenants_keys_whatever_their_prefix(spawn, redis_backends):
    first, second = redis_backends(2)
    port = free_port()
    spawn(processes.proxy, {
        "pa": {"redis": True, "servers": ["%s:%d:1" % (HOST, first.port)]},
        "pb": {"redis": True, "servers": ["%s:%d:1" % (HOST, second.port)]},
        "front": {"listen": "%s:%d" % (HOST, port), "redis": True, "tenants": {
            "acme": {"users": {"alice": "wonder", "ada": {"password": "lace", "read_only": True}}, "route": "pa"},
            "globex": {"users": {"bob": "builder"}, "route": {"prefix": {"globex:": "pb"}}},
        }},
    }, port)
    alice = redis.Redis(host=HOST, port=port, username="alice", password="wonder", protocol=2, socket_timeout=10)
    bob = redis.Redis(host=HOST, port=port, username="bob", password="builder", protocol=2, socket_timeout=10)
    ada = redis.Redis(host=HOST, port=port, username="ada", password="lace", protocol=2, socket_timeout=10)
    assert bob.set("globex:secret", "B")
    # alice names globex's keys: she reaches her own pool's keys of that name, never globex's.
    assert alice.get("globex:secret") is None
    assert alice.set("globex:secret", "A") and alice.delete("globex:other") == 0
    assert bob.get("globex:secret") == b"B"
    assert redis.Redis(host=HOST, port=second.port).get("globex:secret") == b"B"
    assert redis.Redis(host=HOST, port=first.port).get("globex:secret") == b"A"
    # bob's route reaches globex: keys only.
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob.get("acme:1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        bob.mset({"globex:1": "x", "acme:1": "y"})
    assert redis.Redis(host=HOST, port=second.port).get("globex:1") is None
    # ada reads acme's keys and writes nothing.
    assert ada.get("globex:secret") == b"A" and ada.mget("globex:secret", "x") == [b"A", None]
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the 'set' command"):
        ada.set("k", "v")
    with pytest.raises(redis.exceptions.NoPermissionError, match="no permissions to run the 'del' command"):
        ada.delete("globex:secret")
    assert alice.get("globex:secret") == b"A"


def test_the_backend_acl_user_logs_in_and_a_wrong_one_is_a_clear_error(spawn):
    real = acl_redis(spawn, "app on >apppw ~app:* +@all")
    port = free_port()
    proc = spawn(processes.proxy, {"p": processes.pool_config([real.port], port, redis_auth="apppw",
                                                               redis_auth_user="app")}, port)
    client = redis.Redis(host=HOST, port=port, password="apppw", protocol=2, socket_timeout=10)
    assert client.set("app:1", "x") and client.get("app:1") == b"x"
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get("other")  # the backend's own ACL, as the user app
    assert redis.Redis(host=HOST, port=real.port, username="app", password="apppw").get("app:1") == b"x"
    wrong_port = free_port()
    wrong = spawn(processes.proxy, {"p": processes.pool_config([real.port], wrong_port, redis_auth="apppw",
                                                                redis_auth_user="nobody")}, wrong_port)
    client = redis.Redis(host=HOST, port=wrong_port, password="apppw", protocol=2, socket_timeout=10)
    with pytest.raises(redis.exceptions.AuthenticationError):
        client.get("app:1")  # the backend answers NOAUTH: the proxy's login was refused
    poll(lambda: "refused the handshake: WRONGPASS" in wrong.output(), 10, 0.05, "the handshake error in the log")
    assert proc.alive() and wrong.alive()


def test_the_write_commands_are_the_ones_redis_flags_write(spawn):
    real = spawn(processes.redis_server)
    names = sorted({entry[0].decode() for entry in redis_commands.CLUSTER_COMMANDS.values()
                    if entry[redis_commands.KIND] != redis_commands.UNSUPPORTED})
    with socket.create_connection((HOST, real.port), timeout=10) as sock:
        sock.sendall(cmd("COMMAND", "INFO", *names))
        infos = read_reply(sock.makefile("rb"))
    flags = {name: {f.decode() for f in info[2]} for name, info in zip(names, infos)}
    written = {name for name in names if "write" in flags[name]}
    extra = {"xgroup", "eval", "evalsha", "fcall"}  # not flagged write, but they may write (see redis_commands)
    assert redis_commands.WRITE_COMMANDS == written | extra


def worker_stats(control: str) -> dict:
    with BlockingControlClient(control) as ctl:
        return ctl.stats()


def pool_counter(control: str, field: str) -> dict:
    """Worker pid -> the front pool's C{field}."""
    return {pid: stats["pools"]["front"].get(field, 0) for pid, stats in worker_stats(control).items()}


def test_failed_logins_add_up_across_two_workers_and_a_respawned_worker_knows_the_block(spawn, redis_backends):
    (backend,) = redis_backends(1)
    port = free_port()
    config = master_config({
        "pa": {"redis": True, "servers": ["%s:%d:1" % (HOST, backend.port)]},
        "front": {"listen": "%s:%d" % (HOST, port), "redis": True,
                  "tenants": {"acme": {"users": {"alice": "wonder"}, "route": "pa"}}},
    }, auth_failures_limit=4, auth_block_seconds=600)
    control = config["global"]["control"]
    proc = spawn(processes.twistd, config, port)
    # Both workers warm and serving (the control socket refuses connections
    # until it listens, and a worker still warming up leaves new connections waiting).
    poll(lambda: ready_status(control, 2), 20, 0.1, "two ready workers")
    # Connections held open, each known by the worker serving it.
    by_worker = {}
    held = []
    for _ in range(40):
        before = pool_counter(control, "client_connections")
        sock = socket.create_connection((HOST, port), timeout=10)
        held.append(sock)
        after = poll(lambda: (lambda now: now if sum(now.values()) > sum(before.values()) else None)(
            pool_counter(control, "client_connections")), 10, 0.02, "the connection counted")
        pid = next(pid for pid in after if after[pid] > before.get(pid, 0))
        by_worker.setdefault(pid, []).append(sock)
        if len(by_worker) == 2 and all(len(socks) >= 2 for socks in by_worker.values()):
            break
    (a1, a2), (b1, b2) = [socks[:2] for socks in by_worker.values()]

    def auth(sock, password) -> bytes:
        sock.sendall(cmd("AUTH", "alice", password))
        return sock.recv(65536)

    wrongpass = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
    for sock, guess in ((a1, "guess1"), (b1, "guess2"), (a2, "guess3")):  # three over two workers
        assert auth(sock, guess) == wrongpass
    assert auth(a2, "guess3") == wrongpass  # a repeat: not counted towards the limit
    assert auth(b2, "wonder") == b"+OK\r\n"
    assert auth(b2, "guess4") == wrongpass  # the fourth, in the second worker: the address is blocked
    poll(lambda: auth(a1, "wonder") == TOO_MANY, 10, 0.05, "the block in the first worker")
    assert auth(b1, "wonder") == TOO_MANY
    failures = pool_counter(control, "auth_failures")
    assert sorted(failures.values()) == [2, 3]  # the repeat is in the stats
    # A worker killed now is respawned and learns the block from the master.
    victim = next(iter(by_worker))
    os.kill(int(victim), signal.SIGKILL)
    poll(lambda: len(worker_stats(control)) == 2 and victim not in worker_stats(control), 20, 0.1, "a respawn")
    refused = 0
    for _ in range(20):  # new connections land on both workers, the new one among them
        sock = socket.create_connection((HOST, port), timeout=10)
        held.append(sock)
        if auth(sock, "wonder") == TOO_MANY:
            refused += 1
    assert refused == 20
    blocked = pool_counter(control, "auth_blocked")
    assert all(count > 0 for count in blocked.values()), blocked  # both workers, the respawned one too
    for sock in held:
        sock.close()
    assert proc.alive()
