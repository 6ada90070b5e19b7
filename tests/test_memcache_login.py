"""
memcached logins (protocols/memcache_login.py) on a fake reactor, exact bytes:
the text protocol's login as memcached -Y does it, SASL PLAIN on the binary
protocol as memcached -S does it, for a pool's users and a front's tenants
chosen by user; failed logins through the failed-login limiter; and the login
the proxy sends to servers that ask for one (memcache_auth_user).  The words
are memcached 1.6's (tests/test_memcache_login_proxy.py checks them against
real memcached -Y and -S).
"""

from __future__ import annotations

import hashlib
import os
import struct

from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.internet.testing import MemoryReactorClock, StringTransport

from tests.test_memcache_binary import OPAQUE, header, packet, packets, reply_packet, store_extras
from twistedproxy.api import Proxy
from twistedproxy.config import ConfigError, config_from_dict, load_config

GET, SET, QUIT, NOOP, VERSION, GETQ = 0x00, 0x01, 0x07, 0x0A, 0x0B, 0x09
SASL_LIST, SASL_AUTH, SASL_STEP = 0x20, 0x21, 0x22
AUTH_ERROR = 0x20

UNAUTHENTICATED = b"CLIENT_ERROR unauthenticated\r\n"
AUTH_FAILURE = b"CLIENT_ERROR authentication failure\r\n"
TOO_MANY = "too many failed authentication attempts from this address; try again later"


def login(user=b"alice", password=b"secret", key=b"auth", extra=b""):
    credentials = user + b" " + password + extra
    return b"set %s 0 0 %d\r\n%s\r\n" % (key, len(credentials), credentials)


def sasl(user=b"alice", password=b"secret", mechanism=b"PLAIN", authzid=b"", opaque=OPAQUE):
    return packet(SASL_AUTH, mechanism, value=authzid + b"\0" + user + b"\0" + password, opaque=opaque)


def status_and_text(raw):
    fields = header(raw)
    return fields[1], fields[5], raw[24 + fields[3] + fields[2]:]


def proxy_with(pool=None, tenants=None, **glob):
    """A memcached pool (or a front with C{tenants}) on 127.0.0.1:7001 behind a proxy on a fake reactor."""
    reactor = MemoryReactorClock()
    data = {}
    if tenants is not None:
        data["front"] = {"listen": "127.0.0.1:22121", "tenants": tenants}
        data["cache"] = {"servers": ["127.0.0.1:7001:1"]}
        data["other"] = {"servers": ["127.0.0.1:7002:1"]}
    else:
        data["front"] = dict(pool or {}, listen="127.0.0.1:22121", servers=["127.0.0.1:7001:1"])
    if glob:
        data["global"] = glob
    return Proxy(config_from_dict(data), reactor)


def client_of(proxy, host="10.0.0.1"):
    address = IPv4Address("TCP", host, 50000)
    client = proxy.factories["front"].buildProtocol(address)
    transport = StringTransport(peerAddress=address)
    client.makeConnection(transport)
    return client, transport


def backends(proxy):
    """Connect each backend connection the proxy asked for: (address, its transport) in order."""
    out = []
    for host, port, factory, _, _ in proxy.reactor.tcpClients:
        connection = factory.buildProtocol(None)
        transport = StringTransport()
        connection.makeConnection(transport)
        out.append(((host, port), connection, transport))
    return out


USERS = {"alice": "secret", "bob": "sha256:" + hashlib.sha256(b"hunter2").hexdigest()}


# -- the text protocol's login (memcached -Y) ------------------------------------


def test_text_commands_before_a_login_are_refused_and_the_connection_stays():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(b"get k\r\nmg k v\r\nmn\r\nversion\r\nquit\r\nstats\r\nincr k 1\r\nset k 0 0\r\n")
    assert transport.value() == UNAUTHENTICATED * 8
    assert not transport.disconnecting
    assert proxy.reactor.tcpClients == []  # nothing reached a server


def test_a_text_login_is_a_set_of_user_and_password_then_everything_works():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(login(b"alice", b"bad") + b"get k\r\n" + login(b"bob", b"hunter2", key=b"any")
                        + b"get k\r\nset k 0 0 1\r\nv\r\n")
    assert transport.value() == AUTH_FAILURE + UNAUTHENTICATED + b"STORED\r\n"
    [(_, backend, backend_transport)] = backends(proxy)
    proxy.reactor.advance(0)
    assert backend_transport.value() == b"get k\r\nset k 0 0 1\r\nv\r\n"  # the login never reaches a server
    backend.dataReceived(b"END\r\nSTORED\r\n")
    proxy.reactor.advance(0)
    assert transport.value().endswith(b"STORED\r\nEND\r\nSTORED\r\n")


def test_text_logins_framed_byte_by_byte_and_their_errors():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    data = (b"set k 0 0 5\r\nalice\r\n"  # no password
            + b"set k 0 0 12\r\nalice secretXX\r\n"  # the block is not CRLF-terminated: its tail is a line
            + login(b"alice", b"secret", extra=b" more") + b"get k\r\n")
    for i in range(len(data)):
        client.dataReceived(data[i:i + 1])
    assert transport.value() == (b"CLIENT_ERROR bad authentication token format\r\n"
                                 + b"CLIENT_ERROR bad command line termination\r\n"
                                 + UNAUTHENTICATED + b"STORED\r\n")
    [(_, _, backend_transport)] = backends(proxy)
    proxy.reactor.advance(0)
    assert backend_transport.value() == b"get k\r\n"


def test_noreply_does_not_hide_a_login_reply_and_a_set_after_it_is_a_set():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(b"set k 0 0 12 noreply\r\nalice secret\r\n" + login(b"x", b"y"))
    assert transport.value() == b"STORED\r\n"
    [(_, _, backend_transport)] = backends(proxy)
    proxy.reactor.advance(0)
    assert backend_transport.value() == login(b"x", b"y")


# -- SASL PLAIN on the binary protocol (memcached -S) ----------------------------


def test_binary_sasl_mechanisms_auth_and_step():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(packet(SASL_LIST) + packet(VERSION) + sasl(password=b"bad") + packet(SASL_STEP, b"PLAIN")
                        + sasl(mechanism=b"CRAM-MD5") + sasl(authzid=b"bob") + sasl(authzid=b"alice"))
    replies = packets(transport.value())
    assert replies[0] == reply_packet(SASL_LIST, value=b"PLAIN")
    assert status_and_text(replies[1])[:2] == (VERSION, 0)
    assert replies[2] == reply_packet(SASL_AUTH, status=AUTH_ERROR, value=b"Auth failure.")
    assert replies[3] == reply_packet(SASL_STEP, status=AUTH_ERROR, value=b"Auth failure.")
    assert replies[4] == reply_packet(SASL_AUTH, status=AUTH_ERROR, value=b"Auth failure.")
    assert replies[5] == reply_packet(SASL_AUTH, status=AUTH_ERROR, value=b"Auth failure.")
    assert replies[6] == reply_packet(SASL_AUTH, value=b"Authenticated")
    assert len(replies) == 7 and not transport.disconnecting


def test_a_binary_command_before_a_login_gets_auth_failure_and_the_connection_closes():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(packet(GETQ, b"k") + packet(NOOP) + sasl())
    assert transport.value() == reply_packet(GETQ, status=AUTH_ERROR, value=b"Auth failure.")
    assert transport.disconnecting


def test_after_a_binary_login_requests_go_to_the_server_and_a_failed_one_logs_out():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(sasl(b"bob", b"hunter2") + packet(GET, b"k", opaque=7))
    [(_, backend, backend_transport)] = backends(proxy)
    proxy.reactor.advance(0)
    assert backend_transport.value() == packet(GET, b"k", opaque=7)
    backend.dataReceived(reply_packet(GET, status=1, value=b"Not found", opaque=7))
    proxy.reactor.advance(0)
    assert packets(transport.value()) == [reply_packet(SASL_AUTH, value=b"Authenticated"),
                                          reply_packet(GET, status=1, value=b"Not found", opaque=7)]
    transport.clear()
    client.dataReceived(sasl(b"bob", b"wrong") + packet(GET, b"k"))
    assert packets(transport.value()) == [reply_packet(SASL_AUTH, status=AUTH_ERROR, value=b"Auth failure."),
                                          reply_packet(GET, status=AUTH_ERROR, value=b"Auth failure.")]
    assert transport.disconnecting


def test_sasl_packets_of_a_pool_without_users_are_unknown_commands():
    proxy = proxy_with({})
    client, transport = client_of(proxy)
    client.dataReceived(packet(SASL_LIST))
    assert status_and_text(transport.value()) == (SASL_LIST, 0x81, b"Unknown command")


# -- the failed-login limiter ----------------------------------------------------


def test_text_and_binary_failures_add_up_per_address_and_then_logins_are_refused_unchecked():
    proxy = proxy_with({"users": USERS}, auth_failures_limit=3, auth_block_seconds=30)
    text, text_transport = client_of(proxy)
    binary, binary_transport = client_of(proxy)
    text.dataReceived(login(b"alice", b"x") + login(b"mallory", b"secret"))
    binary.dataReceived(sasl(password=b"y") + sasl())
    assert text_transport.value() == AUTH_FAILURE * 2
    assert packets(binary_transport.value()) == [
        reply_packet(SASL_AUTH, status=AUTH_ERROR, value=b"Auth failure."),
        reply_packet(SASL_AUTH, status=AUTH_ERROR, value=TOO_MANY.encode()),
    ]
    text.dataReceived(login())
    assert text_transport.value().endswith(b"CLIENT_ERROR " + TOO_MANY.encode() + b"\r\n")
    elsewhere, elsewhere_transport = client_of(proxy, "10.0.0.2")
    elsewhere.dataReceived(login())
    assert elsewhere_transport.value() == b"STORED\r\n"
    proxy.reactor.advance(30)
    text.dataReceived(login())
    assert text_transport.value().endswith(b"STORED\r\n")
    stats = proxy.stats.pool("front")
    assert (stats.auth_failures, stats.auth_blocked) == (3, 2)


# -- tenants chosen by user on a memcached front -----------------------------------


TENANTS = {
    "acme": {"users": {"alice": "secret"}, "route": "cache", "max_client_connections": 1},
    "globex": {"users": {"bob": "hunter2"}, "route": "other"},
}


def test_a_memcached_front_sends_each_user_to_its_tenants_pool():
    proxy = proxy_with(tenants=TENANTS)
    alice, alice_transport = client_of(proxy)
    bob, bob_transport = client_of(proxy)
    alice.dataReceived(b"get k\r\n" + login() + b"get k\r\n")
    bob.dataReceived(sasl(b"bob", b"hunter2") + packet(GET, b"k"))
    assert alice_transport.value() == UNAUTHENTICATED + b"STORED\r\n"
    assert packets(bob_transport.value()) == [reply_packet(SASL_AUTH, value=b"Authenticated")]
    connected = backends(proxy)
    proxy.reactor.advance(0)
    sent = {address: transport.value() for address, _, transport in connected}
    assert sent == {("127.0.0.1", 7001): b"get k\r\n", ("127.0.0.1", 7002): packet(GET, b"k")}
    front = proxy.stats.pool("front")
    assert front.tenants["acme"].connections == 1 and front.tenants["globex"].connections == 1
    again, again_transport = client_of(proxy)
    again.dataReceived(login())
    assert again_transport.value() == b"CLIENT_ERROR max number of clients reached for tenant 'acme'\r\n"
    alice.connectionLost(Failure(ConnectionDone()))
    assert front.tenants["acme"].connections == 0


# -- logging in to servers (memcache_auth_user) ------------------------------------


def get_from_both(password):
    """A pool that logs in to its server; a text and a binary client's get sent to it (their server connections)."""
    proxy = proxy_with({"memcache_auth_user": "proxy", "memcache_auth_password": password})
    text, text_transport = client_of(proxy)
    binary, binary_transport = client_of(proxy)
    text.dataReceived(b"get k\r\n")
    binary.dataReceived(packet(GET, b"k"))
    proxy.reactor.advance(0)
    (_, text_backend, text_sent), (_, binary_backend, binary_sent) = backends(proxy)
    proxy.reactor.advance(0)
    return proxy, (text_transport, text_backend, text_sent), (binary_transport, binary_backend, binary_sent)


def test_each_new_server_connection_logs_in_first_text_and_binary():
    proxy, text, binary = get_from_both("pw2")
    (text_transport, text_backend, text_sent), (binary_transport, binary_backend, binary_sent) = text, binary
    assert text_sent.value() == b"set auth 0 0 9\r\nproxy pw2\r\nget k\r\n"
    plain = b"\0proxy\0pw2"
    assert binary_sent.value() == (struct.pack(">BBHBBHIIQ", 0x80, SASL_AUTH, 5, 0, 0, 0, 5 + len(plain), 0, 0)
                                   + b"PLAIN" + plain + packet(GET, b"k"))
    text_backend.dataReceived(b"STORED\r\nEND\r\n")
    binary_backend.dataReceived(reply_packet(SASL_AUTH, value=b"Authenticated", opaque=0)
                                + reply_packet(GET, status=1, value=b"Not found"))
    proxy.reactor.advance(0)
    assert text_transport.value() == b"END\r\n"
    assert binary_transport.value() == reply_packet(GET, status=1, value=b"Not found")


def test_a_refused_server_login_fails_the_connections_requests_with_its_words():
    proxy, text, binary = get_from_both("wrong")
    (text_transport, text_backend, text_sent), (binary_transport, binary_backend, binary_sent) = text, binary
    # memcached -Y answers one line for a refused login and the command read with it
    text_backend.dataReceived(AUTH_FAILURE)
    assert text_sent.disconnecting
    text_backend.connectionLost(Failure(ConnectionDone()))
    proxy.reactor.advance(0)
    assert text_transport.value() == (b"SERVER_ERROR backend refused the login:"
                                      b" CLIENT_ERROR authentication failure\r\n")
    binary_backend.dataReceived(reply_packet(SASL_AUTH, status=AUTH_ERROR, value=b"Auth failure.", opaque=0))
    assert binary_sent.disconnecting
    binary_backend.connectionLost(Failure(ConnectionDone()))
    proxy.reactor.advance(0)
    assert status_and_text(binary_transport.value()) == (
        GET, 0x86, b"backend refused the login: status 0x0020 (Auth failure.)")


# -- configuration -------------------------------------------------------------------


def test_login_keys_are_memcached_pools_and_a_server_login_needs_both_halves():
    def problems(pool):
        try:
            config_from_dict({"p": dict(pool, listen="127.0.0.1:22121", servers=["127.0.0.1:7001:1"])})
        except ConfigError as e:
            return str(e)
        return ""

    assert "users" in problems({"redis": True, "users": {"a": "b"}})
    assert "needs memcache_auth_password" in problems({"memcache_auth_user": "a"})
    assert "needs memcache_auth_user" in problems({"memcache_auth_password": "a"})
    assert "expected a password" in problems({"users": {"a": ""}})
    assert "no spaces" in problems({"memcache_auth_user": "a", "memcache_auth_password": "b c"})
    assert problems({"users": {"a": "b"}, "memcache_auth_user": "u", "memcache_auth_password": "p"}) == ""


# -- hand-offs and reloads -------------------------------------------------------------


def test_a_login_survives_a_hand_off_to_another_worker_text_and_binary():
    proxy = proxy_with({"users": USERS})
    text, _ = client_of(proxy)
    binary, _ = client_of(proxy)
    text.dataReceived(login() + b"get ")  # half a command still unframed
    binary.dataReceived(sasl(b"bob", b"hunter2"))
    other = proxy_with({"users": USERS})  # the worker taking the connections over
    for client, rest, expected in ((text, b"k\r\n", b"get k\r\n"), (binary, packet(GET, b"k"), packet(GET, b"k"))):
        adopted = other.factories["front"].adopt()
        adopted_transport = StringTransport()
        adopted.makeConnection(adopted_transport)
        adopted.import_state(client.export_state())
        adopted.dataReceived(rest)
        assert adopted_transport.value() == b""
    other.reactor.advance(0)
    connected = backends(other)
    other.reactor.advance(0)
    assert sorted(transport.value() for _, _, transport in connected) == sorted([b"get k\r\n", packet(GET, b"k")])


def test_a_reload_that_adds_users_or_removes_one_makes_its_clients_log_in():
    proxy = proxy_with({})
    before, transport = client_of(proxy)
    before.dataReceived(b"get ")
    with_users = {"front": {"listen": "127.0.0.1:22121", "servers": ["127.0.0.1:7001:1"], "users": USERS}}
    proxy.reconfigure(config_from_dict(with_users))
    before.dataReceived(b"k\r\n")
    assert transport.value() == UNAUTHENTICATED
    before.dataReceived(login(b"bob", b"hunter2"))
    alice, alice_transport = client_of(proxy)
    alice.dataReceived(login())
    assert transport.value().endswith(b"STORED\r\n") and alice_transport.value() == b"STORED\r\n"
    with_users["front"]["users"] = {"bob": "hunter2"}
    proxy.reconfigure(config_from_dict(with_users))
    alice.dataReceived(b"get k\r\n")
    assert alice_transport.value() == b"STORED\r\n" + UNAUTHENTICATED  # alice is gone
    transport.clear()
    before.dataReceived(b"get k\r\n")
    assert transport.value() == b""  # bob is still logged in: sent on
    del with_users["front"]["users"]
    proxy.reconfigure(config_from_dict(with_users))
    alice.dataReceived(b"get k\r\n")
    assert alice_transport.value() == b"STORED\r\n" + UNAUTHENTICATED  # no login needed: sent on


def test_a_framing_error_right_after_a_login_still_answers_the_login_first():
    proxy = proxy_with({"users": USERS})
    client, transport = client_of(proxy)
    client.dataReceived(login() + b"x" * 9000 + b"\r\n")
    assert transport.value() == b"STORED\r\nCLIENT_ERROR line too long\r\n"
    assert transport.disconnecting


def test_the_example_file_reads():
    config = load_config(os.path.join(os.path.dirname(os.path.dirname(__file__)), "conf", "memcache_logins.yml"))
    pools = {pool.name: pool for pool in config.pools}
    assert [user for user, _ in pools["sessions"].users] == ["web", "batch"]
    assert pools["sessions"].memcache_auth_user == "proxy"
    assert [tenant.name for tenant in pools["shared"].tenants] == ["shop", "blog"]
