"""
TLS on both sides (net/tls.py, config/tls.py), with certificates the tests
make themselves (tests/support/tls.py): real clients (redis-py with ssl,
redis-cli --tls, pymemcache with a TLS context) to the proxy's TLS listeners,
and the proxy to real redis-server --tls-port and memcached -Z backends, in
one process and through a master with 2 workers (a reload that swaps the
certificate, an upgrade).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess

import pytest
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from tests.support import processes
from tests.support.tls import Certificates, peer_common_name
from tests.support.workers import Master, master_config, pid_alive, poll, served_by, set_get
from twistedproxy.config import ConfigError, config_from_dict
from twistedproxy.net.tls import failure_text

HOST = processes.HOST


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certificates(str(tmp_path_factory.mktemp("tls")))


def tls_redis(spawn, certs, *extra):
    """A redis-server that speaks only TLS, with the backend certificate; clients need none."""
    port = processes.free_port()
    cert, key = certs.backend
    return spawn(processes.redis_server, port, "--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                 "--tls-key-file", key, "--tls-ca-cert-file", certs.ca.path, "--tls-auth-clients", "no", *extra)


def tls_memcached(spawn, certs, *extra):
    cert, key = certs.backend
    return spawn(processes.memcached, None, "-Z", "-o", "ssl_chain_cert=%s,ssl_key=%s" % (cert, key), *extra)


def start_proxy(spawn, pools: dict):
    port = next(iter(pools.values()))["listen"].rsplit(":", 1)[1]
    return spawn(processes.proxy, pools, int(port))


def tls_client(port: int, context: ssl.SSLContext, server_hostname="localhost"):
    sock = socket.create_connection((HOST, port), timeout=5)
    return context.wrap_socket(sock, server_hostname=server_hostname)


def roundtrip(sock, request: bytes, end: bytes = b"\r\n") -> bytes:
    sock.sendall(request)
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed after %r" % (data,))
        data += chunk
    return data


# -- configuration -------------------------------------------------------------


def pool(certs, **keys):
    base = {"listen": "127.0.0.1:22121", "redis": True, "servers": ["127.0.0.1:6379:1"]}
    base.update(keys)
    return base


def errors_of(data) -> list:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(data)
    return caught.value.errors


def test_tls_keys_are_read_into_the_pool(certs):
    cert, key = certs.proxy
    config = config_from_dict({"p": pool(certs, tls_cert=cert, tls_key=key, tls_ca=certs.ca.path,
                                         tls_ciphers="ECDHE+AESGCM", tls_min_version=1.3,
                                         backend_tls=True, backend_tls_ca=certs.ca.path,
                                         backend_tls_names={"127.0.0.1:6379": "cache-a.test"})})
    p = config.pools[0]
    assert (p.tls_cert, p.tls_key, p.tls_ca, p.tls_ciphers, p.tls_min_version) == (
        cert, key, certs.ca.path, "ECDHE+AESGCM", "1.3")
    assert p.backend_tls and p.backend_tls_names == (("127.0.0.1:6379", "cache-a.test"),)
    plain = config_from_dict({"p": pool(certs)}).pools[0]
    assert plain.tls_cert is None and plain.tls_min_version == "1.2" and not plain.backend_tls


def test_tls_keys_are_checked_with_their_files(certs, tmp_path):
    cert, key = certs.proxy
    other_cert, _ = certs.client
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert errors_of({"p": pool(certs, tls_key=key, tls_min_version="1.1")}) == [
        "<dict>: pool 'p': key 'tls_min_version': expected one of: 1.2, 1.3, got '1.1'",
        "<dict>: pool 'p': key 'tls_key': needs tls_cert (TLS on the listen address)",
    ]
    assert errors_of({"p": pool(certs, tls_cert=other_cert, tls_key=key)}) == [
        "<dict>: pool 'p': key 'tls_cert': the key in %r does not belong to the certificate in %r" % (key, other_cert)]
    assert errors_of({"p": pool(certs, tls_cert="proxy.crt")}) == [
        "<dict>: pool 'p': key 'tls_cert': must be an absolute path (got 'proxy.crt')"]
    assert errors_of({"p": pool(certs, tls_cert=cert, tls_key=key, tls_ca=str(garbage), tls_ciphers="NOPE")}) == [
        "<dict>: pool 'p': key 'tls_ciphers': no cipher OpenSSL knows in 'NOPE'",
        "<dict>: pool 'p': key 'tls_ca': %r holds no PEM certificate" % (str(garbage),),
    ]
    assert errors_of({"p": pool(certs, backend_tls_ca=certs.ca.path)}) == [
        "<dict>: pool 'p': key 'backend_tls_ca': needs backend_tls: true"]
    assert errors_of({"p": pool(certs, backend_tls=True, backend_tls_names={"10.0.0.1:6379": "x"})}) == [
        "<dict>: pool 'p': key 'backend_tls_names': no server '10.0.0.1:6379' in this pool"]
    front = {"listen": "127.0.0.1:22122", "redis": True, "route": "p", "backend_tls": True}
    assert errors_of({"p": pool(certs), "f": front}) == [
        "<dict>: pool 'f': key 'backend_tls': applies to pools with servers, not to one with route"
        " (set it on the pools its routes name)"]


def test_a_tls_failure_names_itself_in_the_reply():
    from OpenSSL import SSL
    from service_identity import VerificationError
    from service_identity.hazmat import DNS_ID, DNSMismatch

    assert failure_text(SSL.Error([("SSL routines", "", "certificate verify failed")])) == (
        "TLS: certificate verify failed")
    mismatch = VerificationError(errors=[DNSMismatch(mismatched_id=DNS_ID("cache-b.test"))])
    assert failure_text(mismatch) == "TLS: certificate name mismatch (expected cache-b.test)"
    assert failure_text(ValueError("other")) is None


def test_a_stopping_worker_keeps_serving_tls_clients_and_hands_over_only_plain_ones(certs):
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from tests.test_core import Harness
    from twistedproxy.net.tls import ListenerTLS, is_tls
    from twistedproxy.process.handoff import Drain

    cert, key = certs.proxy
    h = Harness(tls_cert=cert, tls_key=key)
    plain, plain_transport = h.client()  # accepted before the reload that turned TLS on
    h.factory.tls = ListenerTLS(h.config.pools[0], h.factory)
    wrapped = h.factory.buildProtocol(None)
    wrapped.makeConnection(StringTransport())
    secure = wrapped.wrappedProtocol
    assert is_tls(secure.transport) and not is_tls(plain.transport)
    sent = []

    class Channel:
        def callRemote(self, command, **arguments):
            sent.append(arguments["fd"])
            from twisted.internet.defer import Deferred
            return Deferred()  # never answered: the client stays "being handed"

    plain_transport.fileno = lambda: 7
    plain_transport.socket = socket.socket()
    reactor = MemoryReactorClock()
    finished = []
    drain = Drain(reactor, lambda: list(h.pool.clients), Channel(), 60.0, lambda: finished.append(True))
    drain.start()
    assert sent == [7] and plain.frozen  # the plain client goes to another worker
    assert not secure.frozen and secure not in drain.sending  # the TLS one is still read from here
    plain_transport.socket.close()
    h.pool.clients.discard(plain)
    reactor.advance(1)
    assert not finished
    secure.connectionLost(Failure(ConnectionDone()))  # the TLS client leaves
    reactor.advance(1)
    assert finished


def test_a_stopping_worker_closes_a_tls_client_idle_for_tls_idle_timeout(certs):
    from twisted.internet.testing import MemoryReactorClock, StringTransport

    from tests.test_core import Harness
    from twistedproxy.net.tls import ListenerTLS
    from twistedproxy.process.handoff import Drain

    cert, key = certs.proxy
    h = Harness(tls_cert=cert, tls_key=key, tls_idle_timeout=500)
    h.factory.tls = ListenerTLS(h.config.pools[0], h.factory)
    wrapped = h.factory.buildProtocol(None)
    wrapped.makeConnection(StringTransport())
    client = wrapped.wrappedProtocol
    reactor = MemoryReactorClock()
    Drain(reactor, lambda: list(h.pool.clients), None, 60.0, lambda: None).start()
    reactor.advance(0.3)
    client.dataReceived(b"PING\r\n")  # answered by the proxy: nothing left in flight
    assert not client.queue
    reactor.advance(0.3)
    assert not client.closed  # heard from 0.3 s ago
    reactor.advance(0.3)
    assert client.closed and wrapped.disconnecting  # idle for 0.6 s: closed, with TLS's close_notify


# -- one process ---------------------------------------------------------------------


@pytest.mark.integration
def test_redis_clients_over_tls_to_plain_backends(spawn, redis_backends, certs):
    import redis

    backend = redis_backends(1)[0]
    port = processes.free_port()
    cert, key = certs.proxy
    start_proxy(spawn, {"r": processes.pool_config([backend.port], port, tls_cert=cert, tls_key=key)})
    client = redis.Redis(host=HOST, port=port, ssl=True, ssl_ca_certs=certs.ca.path, socket_timeout=5, protocol=2)
    assert client.set("tls-key", "tls-value")
    assert client.mget("tls-key", "nope") == [b"tls-value", None]
    pipe = client.pipeline(transaction=False)
    for i in range(200):
        pipe.set("k%d" % i, "v%d" % i)
        pipe.get("k%d" % i)
    assert pipe.execute()[1::2] == [b"v%d" % i for i in range(200)]
    big = b"x" * 3_000_000  # several TLS records each way
    assert client.set("big", big) and client.get("big") == big
    out = subprocess.run(["redis-cli", "--tls", "--cacert", certs.ca.path, "-h", HOST, "-p", str(port),
                          "get", "tls-key"], capture_output=True, timeout=10)
    assert out.stdout == b"tls-value\n", out
    # No plain text on a TLS address: the proxy's TLS layer refuses it.
    with socket.create_connection((HOST, port), timeout=5) as plain:
        plain.sendall(b"*1\r\n$4\r\nPING\r\n")
        assert not plain.recv(100).startswith(b"+PONG")


@pytest.mark.integration
def test_client_certificates_and_the_minimum_version(spawn, redis_backends, certs):
    backend = redis_backends(1)[0]
    port = processes.free_port()
    cert, key = certs.proxy
    start_proxy(spawn, {"r": processes.pool_config([backend.port], port, tls_cert=cert, tls_key=key,
                                                   tls_ca=certs.ca.path, tls_min_version="1.3")})
    with tls_client(port, certs.client_context(certificate=True)) as sock:
        assert roundtrip(sock, b"PING\r\n") == b"+PONG\r\n"
        assert sock.version() == "TLSv1.3"
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_client(port, certs.client_context()) as sock:  # no client certificate
            roundtrip(sock, b"PING\r\n")
    old = certs.client_context(certificate=True)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((ssl.SSLError, ConnectionError)):
        with tls_client(port, old) as sock:
            roundtrip(sock, b"PING\r\n")


@pytest.mark.integration
def test_tls_on_both_sides_with_redis_tls_backends(spawn, certs):
    backends = [tls_redis(spawn, certs), tls_redis(spawn, certs, "--tls-auth-clients", "yes")]
    port = processes.free_port()
    cert, key = certs.proxy
    client_cert, client_key = certs.client
    names = {"%s:%d" % (HOST, b.port): "cache-a.test" for b in backends}
    proxy = start_proxy(spawn, {"r": processes.pool_config(
        [b.port for b in backends], port, tls_cert=cert, tls_key=key, backend_tls=True,
        backend_tls_ca=certs.ca.path, backend_tls_names=names, backend_tls_cert=client_cert,
        backend_tls_key=client_key, timeout=3000)})
    import redis

    client = redis.Redis(host=HOST, port=port, ssl=True, ssl_ca_certs=certs.ca.path, socket_timeout=5, protocol=2)
    keys = ["key%d" % i for i in range(50)]  # over both backends
    assert client.mset({k: k.upper() for k in keys})
    assert client.mget(keys) == [k.upper().encode() for k in keys]
    assert "TLS:" not in proxy.output()


@pytest.mark.integration
def test_a_failed_backend_check_is_an_error_reply_never_plain_text(spawn, redis_backends, certs):
    good = tls_redis(spawn, certs)
    plain = redis_backends(1)[0]
    pools = {}
    ports = {}
    cases = {
        # a server whose certificate the CA did not sign
        "stranger": ([good.port], {"backend_tls_ca": certs.stranger.path}, b"-ERR TLS: certificate verify failed\r\n"),
        # a certificate for another name than the one expected of that server
        "name": ([good.port], {"backend_tls_ca": certs.ca.path,
                               "backend_tls_names": {"%s:%d" % (HOST, good.port): "cache-b.test"}},
                 b"-ERR TLS: certificate name mismatch (expected cache-b.test)\r\n"),
        # a backend without TLS: no fallback to plain text
        "plain": ([plain.port], {"backend_tls_ca": certs.ca.path}, None),
        # a server line's name sets placement only: the certificate is checked against the host
        "named": (["%d:1 cache-a.test" % good.port], {"backend_tls_ca": certs.ca.path}, b"+OK\r\n"),
    }
    for name, (servers, keys, _) in cases.items():
        ports[name] = processes.free_port()
        config = processes.pool_config([], ports[name], backend_tls=True, timeout=3000, **keys)
        config["servers"] = ["%s:%s" % (HOST, s) if isinstance(s, str) else "%s:%d:1" % (HOST, s) for s in servers]
        pools[name] = config
    proxy = spawn(processes.proxy, pools, ports["named"])
    for name in cases:
        processes.wait_for_port(ports[name])
    for name, (_, _, expected) in cases.items():
        with socket.create_connection((HOST, ports[name]), timeout=10) as sock:
            reply = roundtrip(sock, b"SET k v\r\nGET k\r\n", b"\r\n")
            while reply.count(b"\r\n") < 2 and not reply.startswith(b"+OK\r\n$"):
                reply += sock.recv(1000)
            if expected is None:
                # Redis reads the ClientHello as an unfinished inline command: the request times out.
                assert reply.startswith(b"-ERR ") and b"+OK" not in reply, reply
                with socket.create_connection((HOST, plain.port), timeout=5) as direct:
                    assert roundtrip(direct, b"GET k\r\n") == b"$-1\r\n"  # nothing came in plain text
            elif expected == b"+OK\r\n":
                assert reply.startswith(b"+OK\r\n"), reply
            else:
                assert reply == expected * 2, (name, reply)
    lines = proxy.output().splitlines()
    for text in ("certificate verify failed", "certificate name mismatch (expected cache-b.test)"):
        logged = [line for line in lines if text in line]
        assert logged and all("#error] backend 127.0.0.1:%d" % good.port in line for line in logged), lines


@pytest.mark.integration
def test_memcached_tls_backends_and_a_pymemcache_tls_client(spawn, certs):
    from pymemcache.client.base import Client

    backends = [tls_memcached(spawn, certs), tls_memcached(spawn, certs)]
    port = processes.free_port()
    cert, key = certs.proxy
    start_proxy(spawn, {"m": processes.pool_config(
        [b.port for b in backends], port, redis=False, tls_cert=cert, tls_key=key, backend_tls=True,
        backend_tls_ca=certs.ca.path, timeout=3000)})
    client = Client((HOST, port), tls_context=certs.client_context(), timeout=10)
    for i in range(40):
        assert client.set("mk%d" % i, b"value%d" % i)
    assert client.get_many(["mk%d" % i for i in range(40)]) == {"mk%d" % i: b"value%d" % i for i in range(40)}
    client.close()


# -- master and 2 workers -----------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("listen_mode", ["reuseport", "shared"])
def test_workers_reload_a_renewed_certificate_and_keep_tls_clients_through_an_upgrade(
        spawn, memcached_backends, certs, tmp_path, listen_mode):
    backend = memcached_backends(1)[0]
    port = processes.free_port()
    cert, key = str(tmp_path / "proxy.crt"), str(tmp_path / "proxy.key")
    shutil.copy(certs.proxy[0], cert)
    shutil.copy(certs.proxy[1], key)
    config = master_config({"m": processes.pool_config([backend.port], port, redis=False, tls_cert=cert,
                                                       tls_key=key)}, worker_shutdown_timeout=60, listen_mode=listen_mode)
    master = Master(spawn, config, port)
    context = certs.client_context()
    first = [tls_client(port, context) for _ in range(6)]
    for i, sock in enumerate(first):
        set_get(sock, b"a%d" % i, b"%d" % i)
        assert peer_common_name(sock) == "proxy one"
    old_workers = master.worker_pids()
    assert {served_by(sock) for sock in first} <= old_workers

    # A reload with the renewed certificate in the same files: the workers stay,
    # connected clients keep their sessions, new clients get the new certificate.
    shutil.copy(certs.proxy_renewed[0], cert)
    shutil.copy(certs.proxy_renewed[1], key)
    master.signal(signal.SIGHUP)

    def renewed():
        with tls_client(port, context) as sock:
            return peer_common_name(sock) == "proxy two"

    poll(lambda: all(renewed() for _ in range(4)), 20, 0.1, "new clients to get the renewed certificate")
    assert master.worker_pids() == old_workers
    for i, sock in enumerate(first):
        set_get(sock, b"a%d" % i, b"again %d" % i)

    # An upgrade: the old workers keep their TLS clients (a session cannot move)
    # and serve them while new clients go to the new master's workers.
    old_master = master.process.pid
    master.signal(signal.SIGUSR2)
    new_workers = poll(lambda: master.current_status()["pid"] != old_master and master.worker_pids(), 60, 0.1,
                       "the new master")

    def fresh_client():
        sock = tls_client(port, context)
        if served_by(sock) in new_workers:
            return sock
        sock.close()  # accepted by an old worker before it stopped listening

    fresh = poll(fresh_client, 30, 0.1, "a new client served by a new worker")
    set_get(fresh, b"fresh", b"new")
    for i, sock in enumerate(first):
        set_get(sock, b"b%d" % i, b"%d" % i)
        assert served_by(sock) in old_workers
    assert pid_alive(old_master)  # draining: its workers still serve their TLS clients
    for sock in first:
        sock.close()
    poll(lambda: not pid_alive(old_master), 30, 0.1, "the old master to leave once its clients left")
    set_get(fresh, b"b5", b"5")
    fresh.close()
    new_master = master.current_status()["pid"]
    os.kill(new_master, signal.SIGTERM)
    poll(lambda: not pid_alive(new_master), 20, 0.1, "the new master to stop")
