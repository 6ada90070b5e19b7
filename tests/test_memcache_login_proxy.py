"""
memcached logins end to end: the real proxy process with real memcached 1.6
behind it and real clients (pymemcache for the text login, libmemcached's
memccp/memccat for SASL PLAIN).  The proxy's login answers are checked
against memcached -Y (text) and memcached -S (binary SASL, with a sasldb made
by saslpasswd2) byte for byte, and the proxy logs in to servers started with
-Y and -S.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheServerError

from tests.support import processes
from tests.support.workers import master_config, poll, ready_status
from twistedproxy.control.client import BlockingControlClient

pytestmark = pytest.mark.integration

HOST = processes.HOST
GET, VERSION, SASL_LIST, SASL_AUTH = 0x00, 0x0B, 0x20, 0x21

needs_sasl = pytest.mark.skipif(shutil.which("saslpasswd2") is None, reason="sasl2-bin (saslpasswd2) is not installed")
needs_libmemcached = pytest.mark.skipif(shutil.which("memccp") is None or shutil.which("memccat") is None,
                                        reason="libmemcached-tools is not installed")


class Conn:
    """A client socket that reads exactly what it is told to."""

    def __init__(self, port):
        self.sock = socket.create_connection((HOST, port), timeout=10)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def line(self, until=b"\r\n") -> bytes:
        """Everything up to and including the next C{until}."""
        while until not in self.buf:
            assert self._fill(), "closed before %r: %r" % (until, self.buf)
        end = self.buf.index(until) + len(until)
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def packet(self) -> bytes:
        while len(self.buf) < 24 or len(self.buf) < 24 + struct.unpack_from(">I", self.buf, 8)[0]:
            assert self._fill(), "closed before a whole packet: %r" % (self.buf,)
        end = 24 + struct.unpack_from(">I", self.buf, 8)[0]
        out, self.buf = self.buf[:end], self.buf[end:]
        return out

    def closed(self) -> bool:
        """True when the peer closed the connection (after what was read)."""
        return not self.buf and not self._fill()

    def close(self) -> None:
        self.sock.close()


def packet(opcode, key=b"", value=b"", opaque=0x01020304):
    return struct.pack(">BBHBBHIIQ", 0x80, opcode, len(key), 0, 0, 0, len(key) + len(value), opaque, 0) + key + value


def masked(raw: bytes) -> bytes:
    """A binary reply with a version's body made equal."""
    if raw[1] == VERSION:
        return raw[:8] + struct.pack(">I", 1) + raw[12:24] + b"x"
    return raw


def login(user=b"alice", password=b"secret"):
    credentials = user + b" " + password
    return b"set auth 0 0 %d\r\n%s\r\n" % (len(credentials), credentials)


@pytest.fixture
def auth_file():
    fd, path = tempfile.mkstemp(prefix="tp-auth-")
    with os.fdopen(fd, "w") as f:
        f.write("alice:secret\n")
    yield path
    os.unlink(path)


@pytest.fixture
def sasl_memcached(spawn):
    """A memcached -S whose one user is alice/secret (its sasldb made by saslpasswd2)."""
    directory = tempfile.mkdtemp(prefix="tp-sasl-")
    db = os.path.join(directory, "sasldb2")
    subprocess.run(["saslpasswd2", "-p", "-a", "memcached", "-c", "-f", db, "alice"], input=b"secret", check=True)
    with open(os.path.join(directory, "memcached.conf"), "w") as f:
        f.write("mech_list: plain\nsasldb_path: %s\n" % (db,))
    port = processes.free_port()
    argv = ["memcached", "-l", HOST, "-p", str(port), "-U", "0", "-m", "64", "-S"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    yield spawn(processes.Process, argv, port, env=dict(os.environ, SASL_CONF_PATH=directory))
    shutil.rmtree(directory, ignore_errors=True)


def proxy_for(spawn, backend_port, **pool_keys):
    port = processes.free_port()
    pool = processes.pool_config([backend_port], port, redis=False, **pool_keys)
    spawn(processes.proxy, {"alpha": pool}, port)
    return port


# -- the proxy answers logins as memcached does --------------------------------------


def text_login_conversation(port) -> list:
    """memcached -Y answers one reply per read while a client is not logged in: one command at a time."""
    conn = Conn(port)
    out = []
    try:
        for data in (b"get k\r\n", b"mn\r\n", b"set k 0 0 5\r\nalice\r\n", login(b"alice", b"bad"),
                     b"version\r\n", login(b"alice", b"secret")):
            conn.send(data)
            out.append(conn.line())
        conn.send(b"set k 0 0 1\r\nv\r\nget k\r\n")
        out.append(conn.line(b"END\r\n"))
    finally:
        conn.close()
    return out


def test_the_text_login_answers_like_memcached_Y(spawn, memcached_backends, auth_file):
    real = spawn(processes.memcached, None, "-Y", auth_file)
    [plain] = memcached_backends(1)
    port = proxy_for(spawn, plain.port, users={"alice": "secret"})
    expected = text_login_conversation(real.port)
    assert expected[:5] == [b"CLIENT_ERROR unauthenticated\r\n"] * 2 + [
        b"CLIENT_ERROR bad authentication token format\r\n", b"CLIENT_ERROR authentication failure\r\n",
        b"CLIENT_ERROR unauthenticated\r\n"]
    assert text_login_conversation(port) == expected


def sasl_conversation(port) -> list:
    conn = Conn(port)
    out = []
    try:
        for data in (packet(SASL_LIST), packet(VERSION), packet(SASL_AUTH, b"PLAIN", b"\0alice\0bad"),
                     packet(SASL_AUTH, b"PLAIN", b"\0alice\0secret"), packet(GET, b"nothing-here")):
            conn.send(data)
            out.append(masked(conn.packet()))
    finally:
        conn.close()
    conn = Conn(port)
    try:
        conn.send(packet(GET, b"k"))
        out.append(conn.packet())
        out.append(conn.closed())
    finally:
        conn.close()
    return out


@needs_sasl
def test_sasl_plain_answers_like_memcached_S(spawn, memcached_backends, sasl_memcached):
    [plain] = memcached_backends(1)
    port = proxy_for(spawn, plain.port, users={"alice": "secret"})
    expected = sasl_conversation(sasl_memcached.port)
    assert expected[0][24:] == b"PLAIN" and expected[3][24:] == b"Authenticated" and expected[-1] is True
    assert sasl_conversation(port) == expected


# -- real clients log in through the proxy ----------------------------------------------


def test_pymemcache_logs_in_with_a_set_and_users_see_one_pool(spawn, memcached_backends):
    [plain] = memcached_backends(1)
    port = proxy_for(spawn, plain.port, users={"alice": "secret"})
    stranger = Client((HOST, port))
    with pytest.raises(MemcacheClientError, match="unauthenticated"):
        stranger.get("k")
    client = Client((HOST, port))
    assert client.set("auth", "alice secret", noreply=False) is True
    assert client.set("k", "v", noreply=False) is True
    assert client.get("k") == b"v"
    stranger.close()
    client.close()


@needs_libmemcached
def test_libmemcached_logs_in_with_sasl_plain(spawn, memcached_backends, tmp_path):
    [plain] = memcached_backends(1)
    port = proxy_for(spawn, plain.port, users={"alice": "secret"})
    server = "--servers=%s:%d" % (HOST, port)
    (tmp_path / "greeting").write_bytes(b"hello")
    copy = subprocess.run(["memccp", server, "--binary", "--username=alice", "--password=secret", "greeting"],
                          cwd=tmp_path, capture_output=True)
    assert copy.returncode == 0, copy.stderr
    read = subprocess.run(["memccat", server, "--binary", "--username=alice", "--password=secret", "greeting"],
                          capture_output=True)
    assert read.stdout == b"hello\n"  # memccat ends each value with a newline
    refused = subprocess.run(["memccat", server, "--binary", "--username=alice", "--password=bad", "greeting"],
                             capture_output=True)
    assert refused.returncode != 0 and b"AUTHENTICATION FAILURE" in refused.stderr


def test_tenants_chosen_by_user_on_a_memcached_front_keep_their_keys_apart(spawn, memcached_backends):
    first, second = memcached_backends(2)
    port = processes.free_port()
    config = {
        "front": {"listen": "%s:%d" % (HOST, port), "tenants": {
            "acme": {"users": {"alice": "secret"}, "route": "acme_pool"},
            "globex": {"users": {"bob": "hunter2"}, "route": "globex_pool"},
        }},
        "acme_pool": {"servers": ["%s:%d:1" % (HOST, first.port)]},
        "globex_pool": {"servers": ["%s:%d:1" % (HOST, second.port)]},
    }
    spawn(processes.proxy, config, port)
    alice, bob = Client((HOST, port)), Client((HOST, port))
    assert alice.set("auth", "alice secret", noreply=False) and bob.set("auth", "bob hunter2", noreply=False)
    assert alice.set("acme:k", "a", noreply=False) and bob.set("globex:k", "b", noreply=False)
    assert alice.get("globex:k") is None and bob.get("acme:k") is None  # whatever the prefix
    assert alice.get("acme:k") == b"a" and bob.get("globex:k") == b"b"
    assert Client((HOST, first.port)).get("acme:k") == b"a"
    assert Client((HOST, second.port)).get("acme:k") is None


# -- the proxy logs in to servers that ask for it --------------------------------------------


def test_the_proxy_logs_in_to_a_memcached_Y_server(spawn, auth_file):
    real = spawn(processes.memcached, None, "-Y", auth_file)
    port = proxy_for(spawn, real.port, memcache_auth_user="alice", memcache_auth_password="secret")
    client = Client((HOST, port))
    assert client.set("k", "v", noreply=False) is True
    assert client.get("k") == b"v"
    client.close()
    wrong = proxy_for(spawn, real.port, memcache_auth_user="alice", memcache_auth_password="wrong")
    client = Client((HOST, wrong))
    # memcached -Y answers a refused login read with the next command in one line (its
    # last reply's): "authentication failure" or "unauthenticated"
    with pytest.raises(MemcacheServerError, match="backend refused the login: CLIENT_ERROR (authentication failure"
                                                  "|unauthenticated)"):
        client.get("k")
    client.close()


@needs_sasl
@needs_libmemcached
def test_the_proxy_logs_in_to_a_memcached_S_server_with_sasl_plain(spawn, sasl_memcached, tmp_path):
    port = proxy_for(spawn, sasl_memcached.port, memcache_auth_user="alice", memcache_auth_password="secret")
    server = "--servers=%s:%d" % (HOST, port)
    (tmp_path / "greeting").write_bytes(b"hello")
    copy = subprocess.run(["memccp", server, "--binary", "greeting"], cwd=tmp_path, capture_output=True)
    assert copy.returncode == 0, copy.stderr
    read = subprocess.run(["memccat", server, "--binary", "greeting"], capture_output=True)
    assert read.stdout == b"hello\n"  # memccat ends each value with a newline
    wrong = proxy_for(spawn, sasl_memcached.port, memcache_auth_user="alice", memcache_auth_password="wrong")
    conn = Conn(wrong)
    try:
        conn.send(packet(GET, b"greeting"))
        reply = conn.packet()
    finally:
        conn.close()
    assert struct.unpack_from(">H", reply, 6)[0] == 0x86
    assert reply[24:] == b"backend refused the login: status 0x0020 (Auth failure.)"


# -- failed logins across workers ---------------------------------------------------------


def test_failed_text_and_binary_logins_add_up_across_two_workers(spawn, memcached_backends):
    [plain] = memcached_backends(1)
    port = processes.free_port()
    config = master_config({"alpha": processes.pool_config([plain.port], port, redis=False,
                                                           users={"alice": "secret"})},
                           auth_failures_limit=3, auth_block_seconds=600)
    control = config["global"]["control"]
    spawn(processes.twistd, config, port)

    def worker_failures():
        with BlockingControlClient(control) as ctl:
            stats = ctl.stats()
        return len(stats), sum(s["pools"]["alpha"].get("auth_failures", 0) for s in stats.values())

    # Both workers warm and serving (the control socket refuses connections
    # until it listens, and a worker still warming up leaves new connections waiting).
    poll(lambda: ready_status(control, 2), 20, 0.1, "two ready workers")
    for attempt in (b"bad1", b"bad2"):  # each on a connection of its own, whichever worker takes it
        conn = Conn(port)
        conn.send(login(b"alice", attempt))
        assert conn.line() == b"CLIENT_ERROR authentication failure\r\n"
        conn.close()
    conn = Conn(port)
    conn.send(packet(SASL_AUTH, b"PLAIN", b"\0mallory\0secret"))
    assert conn.packet()[24:] == b"Auth failure."
    conn.close()
    assert poll(lambda: worker_failures()[1] == 3, 10, 0.05, "three failures counted")
    too_many = b"too many failed authentication attempts from this address; try again later"

    def refused() -> bool:
        text, binary = Conn(port), Conn(port)
        try:
            text.send(login())
            binary.send(packet(SASL_AUTH, b"PLAIN", b"\0alice\0secret"))
            return text.line() == b"CLIENT_ERROR " + too_many + b"\r\n" and binary.packet()[24:] == too_many
        finally:
            text.close()
            binary.close()

    for _ in range(6):  # new connections reach both workers: each knows the block
        poll(refused, 10, 0.05, "the block in every worker")
