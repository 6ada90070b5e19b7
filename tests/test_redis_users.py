"""
Redis users in memory: read-only users (exact bytes of the NOPERM replies),
pbkdf2 passwords and the remembered success, HELLO before a login, the
backend's ACL user in the handshake, the configuration that declares them, and
the command that makes a pbkdf2 password.
"""

from __future__ import annotations

import io

import pytest

from twistedproxy.config import passwords
from twistedproxy.config.passwords import Checker, Password
from twistedproxy.control import cli as ctl
from twistedproxy.protocols import redis_commands
from tests.support.resp import cmd
from tests.test_config_routes import parse, refusal
from tests.test_core import Harness
from tests.test_tenants import Front, redis_pools

FAST_HASH = passwords.make(b"s3cret", iterations=1000, salt="NaCl")

USERS = {
    "tenants": {
        "acme": {"users": {"alice": FAST_HASH, "reader": {"password": "ro-pw", "read_only": True}},
                 "route": "p7001"},
        "globex": {"users": {"bob": {"password": "pw"}}, "route": "p7002"},
    }
}

NOPERM_SET = b"-NOPERM this user has no permissions to run the 'set' command\r\n"


def test_a_read_only_user_reads_and_its_writes_get_noperm():
    front = Front(redis_pools(USERS))
    client, transport = front.client()
    client.dataReceived(cmd("AUTH", "reader", "ro-pw") + cmd("GET", "k") + cmd("SET", "k", "v")
                        + cmd("MGET", "a", "b") + cmd("DEL", "a", "b") + cmd("EVAL", "return 1", "1", "k")
                        + cmd("incr", "n") + cmd("PING"))
    backend = front.accept()[7001]
    assert backend.pending() == [[b"GET", b"k"], [b"MGET", b"a", b"b"]]
    front.answer_all()
    assert transport.value() == (
        b"+OK\r\n$-1\r\n" + NOPERM_SET + b"*2\r\n$-1\r\n$-1\r\n"
        b"-NOPERM this user has no permissions to run the 'del' command\r\n"
        b"-NOPERM this user has no permissions to run the 'eval' command\r\n"
        b"-NOPERM this user has no permissions to run the 'incr' command\r\n"
        b"+PONG\r\n"
    )
    # The same connection logged in as a user who may write: writes go through.
    client.dataReceived(cmd("AUTH", "alice", "s3cret") + cmd("SET", "k", "v"))
    assert backend.pending() == [[b"SET", b"k", b"v"]]


def test_read_only_survives_a_hand_off_and_a_reload_may_change_it():
    front = Front(redis_pools(USERS))
    client, transport = front.client()
    client.dataReceived(cmd("AUTH", "reader", "ro-pw"))
    state = client.parser.state()
    other = Front(redis_pools(USERS))
    moved, moved_transport = other.client()
    moved.parser.restore(state)
    moved.dataReceived(cmd("SET", "k", "v"))
    assert moved_transport.value() == NOPERM_SET
    writable = {"tenants": dict(USERS["tenants"], acme=dict(USERS["tenants"]["acme"],
                                                           users={"reader": "ro-pw"}))}
    from twistedproxy.config import config_from_dict

    front.proxy.reconfigure(config_from_dict(redis_pools(writable)))
    client.dataReceived(cmd("SET", "k", "v"))
    assert front.accept()[7001].pending() == [[b"SET", b"k", b"v"]]


def test_hello_before_a_login_gets_redis_7s_own_noauth_and_hello_auth_logs_in():
    front = Front(redis_pools(USERS))
    client, transport = front.client()
    client.dataReceived(cmd("HELLO", "3") + cmd("HELLO", "2", "Auth", "bob") + cmd("HELLO", "2", "AUTH", "bob", "pw")
                        + cmd("GET", "k"))
    reply = transport.value()
    assert reply.startswith(
        b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH"
        b" <user> <pass> option can be used to authenticate the client and select the RESP protocol"
        b" version at the same time\r\n"
        b"-ERR Syntax error in HELLO option 'Auth'\r\n*14\r\n")
    assert front.accept()[7002].pending() == [[b"GET", b"k"]]


def test_a_pbkdf2_password_is_checked_once_then_remembered_right_or_wrong(monkeypatch):
    checker = Checker()
    password = passwords.parse(FAST_HASH)
    assert password == Password(pbkdf2=(1000, "NaCl", FAST_HASH.rsplit(":", 1)[1]))
    calls = []
    real = passwords.matches
    monkeypatch.setattr(passwords, "matches", lambda *a: calls.append(1) or real(*a))
    assert not checker.check(b"alice", password, b"wrong")
    assert checker.check(b"alice", password, b"s3cret")
    assert checker.check(b"alice", password, b"s3cret")
    assert not checker.check(b"alice", password, b"wrong")
    assert len(calls) == 2  # the second success and the repeated failure cost no PBKDF2
    assert not checker.check(b"bob", passwords.parse("sha256:" + "0" * 64), b"x")


def test_password_forms_and_their_errors():
    assert passwords.parse("plain") == Password(text="plain")
    for text, message in (
        ("sha256:abc", "a sha256: password is 64 hex digits after 'sha256:'"),
        ("pbkdf2:sha256:1000:salt:abc", "a pbkdf2 password is pbkdf2:sha256:ITERATIONS:SALT:HEX"),
        ("pbkdf2:sha256:10:salt:" + "0" * 64, "a pbkdf2 password needs at least 1000 iterations (got 10)"),
    ):
        with pytest.raises(ValueError) as caught:
            passwords.parse(text)
        assert str(caught.value).startswith(message)


BACKEND = "p:\n  redis: true\n  servers:\n    - 127.0.0.1:7001:1\n"


def test_users_with_read_only_and_pbkdf2_in_the_file():
    config = parse(BACKEND + """\
front:
  listen: 127.0.0.1:22121
  redis: true
  tenants:
    acme:
      users:
        alice: "%s"
        reader: {password: pw, read_only: true}
        writer: {password: pw2, read_only: false}
      route: p
""" % (FAST_HASH,))
    (acme,) = config.pool("front").tenants
    assert [user for user, _ in acme.users] == ["alice", "reader", "writer"]
    assert acme.read_only_users == ("reader",)
    assert acme.users[0][1].pbkdf2[0] == 1000
    head = BACKEND + "front:\n  listen: 127.0.0.1:22121\n  redis: true\n  tenants:\n    acme:\n      route: p\n      users: "
    assert refusal(head + "{alice: {read_only: true}}\n") == [
        "routes.yml:11: pool 'front': key 'tenants': tenant 'acme': user 'alice': password is missing"]
    assert refusal(head + "{alice: {password: x, admin: true}}\n") == [
        "routes.yml:11: pool 'front': key 'tenants': tenant 'acme': user 'alice': unknown key 'admin'"
        " (expected password, read_only)"]
    assert refusal(head + "{alice: 'pbkdf2:sha256:5:s:%s'}\n" % ("0" * 64,)) == [
        "routes.yml:11: pool 'front': key 'tenants': tenant 'acme': user 'alice': a pbkdf2 password needs at"
        " least 1000 iterations (got 5)"]


def test_redis_auth_user_needs_redis_auth_and_a_pool_with_servers():
    config = parse("p:\n  listen: 127.0.0.1:22121\n  redis: true\n  redis_auth: pw\n  redis_auth_user: app\n"
                   "  servers:\n    - 127.0.0.1:7001:1\n")
    assert config.pool("p").redis_auth_user == "app"
    errors = refusal("p:\n  listen: 127.0.0.1:22121\n  redis: true\n  redis_auth_user: app\n"
                     "  servers:\n    - 127.0.0.1:7001:1\n")
    assert errors == ["routes.yml:4: pool 'p': key 'redis_auth_user': needs redis_auth (the user's password)"]


def test_the_backend_acl_user_logs_in_on_every_connection_and_clients_may_name_it():
    h = Harness(servers=(7001,), redis_auth="pw", redis_auth_user="app")
    c, t = h.client()
    c.dataReceived(cmd("AUTH", "app", "pw") + cmd("GET", "a") + cmd("AUTH", "other", "pw") + cmd("AUTH", "default", "pw"))
    backend = h.accept()[7001]
    assert backend.pending() == [[b"AUTH", b"app", b"pw"], [b"GET", b"a"]]
    backend.answer(2)
    assert t.value() == b"+OK\r\n$-1\r\n-ERR invalid password\r\n+OK\r\n"


def test_every_write_command_is_in_the_command_table():
    table = redis_commands.COMMANDS
    for name in redis_commands.WRITE_COMMANDS:
        if name in ("rename", "renamenx", "msetnx"):
            assert redis_commands.CLUSTER_COMMANDS[name.encode()][redis_commands.WRITE], name
        else:
            assert table[name.encode()][redis_commands.WRITE], name
    assert not any(table[name][redis_commands.WRITE] for name in (b"get", b"eval_ro", b"fcall_ro", b"xinfo"))


def test_hash_password_prints_a_line_the_configuration_takes(capsys):
    out = io.StringIO()
    assert passwords.main(["--iterations", "1000"], stdin=io.BytesIO(b"hunter2\n"), stdout=out) == 0
    line = out.getvalue().strip()
    assert line.startswith("pbkdf2:sha256:1000:")
    assert passwords.matches(passwords.parse(line), b"hunter2")
    assert passwords.main([], stdin=io.BytesIO(b""), stdout=out) == 1
    with pytest.raises(SystemExit):
        ctl.main(["hash-password", "--iterations", "5"])
