"""
The admin surface: the read-only metrics address (C{global: metrics_http}),
the admin token and its rotation by a reload, the control socket's
permissions and what C{cacheproxyctl} says when it cannot connect.

Real processes (C{cacheproxy}, C{twistd -n cacheproxy} with a master and 2
workers) on loopback, real HTTP; the control socket's mode from the moment it
exists is checked on the bind itself.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile

import pytest
import yaml
from twisted.internet.protocol import ServerFactory
from twisted.internet.testing import MemoryReactorClock

from tests.support import processes
from tests.support.processes import HOST, free_port
from tests.support.workers import Master, kill_pid, master_config, poll, ready_status
from twistedproxy.config import ConfigError, ListenSpec, config_from_dict
from twistedproxy.control import cli
from twistedproxy.net import sockets

OLD_TOKEN = "old-admin-token"
NEW_TOKEN = "new-admin-token"


def request(port, method, path, body=None, token=None):
    """One HTTP request: (status, headers as a dict of lower-case names, body)."""
    headers = {"Content-Type": "application/x-www-form-urlencoded"} if body is not None else {}
    if token is not None:
        headers["Authorization"] = "Bearer " + token
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def slowlog_thresholds(port, token) -> list:
    """Every process's slowlog_threshold, as a POST /tune that changes nothing reports them."""
    status, _, body = request(port, "POST", "/tune", b"", token=token)
    assert status == 200, body
    return [worker["slowlog_threshold"] for worker in json.loads(body)["workers"]]


def check_read_only(metrics_port, http_port, token, processes_count) -> None:
    """The metrics address reads and refuses every other method on every path; nothing changes."""
    for path in ("/metrics", "/status", "/stats.json"):
        status, headers, body = request(metrics_port, "GET", path)
        assert status == 200 and headers["cache-control"] == "no-store", (path, status, body)
    assert b"cacheproxy_build_info" in request(metrics_port, "GET", "/metrics")[2]
    assert json.loads(request(metrics_port, "GET", "/stats.json")[2])["twistedproxy"]
    page = request(metrics_port, "GET", "/status")[2]
    assert b'href="/metrics"' in page and b"/slowlog" not in page  # links only to what it serves
    status, headers, body = request(metrics_port, "HEAD", "/metrics")
    assert status == 200 and body == b""
    for path in ("/", "/slowlog", "/tune", "/nothing"):
        assert request(metrics_port, "GET", path)[0] == 404, path
    # No POST at all, whatever the path and whatever token it carries.
    for method, path in (("POST", "/tune"), ("POST", "/metrics"), ("POST", "/"), ("POST", "/nothing"),
                         ("PUT", "/tune"), ("DELETE", "/metrics"), ("PATCH", "/status")):
        status, headers, body = request(metrics_port, method, path, b"slowlog_threshold=0.5", token=token)
        assert (status, headers["allow"], body) == (405, "GET, HEAD", b"method not allowed\n"), (method, path)
    assert slowlog_thresholds(http_port, token) == [0.01] * processes_count


# -- configuration ------------------------------------------------------------------


def global_section(**keys):
    return config_from_dict({"a": {"listen": "127.0.0.1:1", "servers": ["127.0.0.1:2:1"]}, "global": keys}).global_


def test_control_mode_and_metrics_http_keys(tmp_path):
    assert global_section(control="/tmp/c.sock").control_mode == 0o600
    assert global_section(control_mode=0o660).control_mode == 0o660
    conf = tmp_path / "c.yml"
    conf.write_text("a:\n  listen: 127.0.0.1:1\n  servers: [127.0.0.1:2:1]\nglobal:\n  control_mode: 0660\n")
    from twistedproxy.config import load_config

    assert load_config(str(conf)).global_.control_mode == 0o660  # the octal text, as listen's permissions
    for bad, why in ((0o060, "0060 leaves the owner unable to connect"),
                     ("0", "0000 leaves the owner unable to connect"),
                     ("99", "invalid socket permissions '99'"),
                     (True, "expected octal permissions like 0600")):
        with pytest.raises(ConfigError) as error:
            global_section(control_mode=bad)
        assert "key 'control_mode': " + why in error.value.errors[0]
    assert global_section(metrics_http="127.0.0.1:9").metrics_http == ListenSpec(host="127.0.0.1", port=9)
    with pytest.raises(ConfigError) as error:
        global_section(metrics_http="127.0.0.1:9", stats_http="127.0.0.1:9")
    assert "key 'metrics_http': is stats_http's address" in error.value.errors[0]


# -- the control socket ------------------------------------------------------------------


@pytest.mark.parametrize("perm, mode", [(0o600, 0o600), (0o660, 0o660), (None, 0o666)])
def test_a_unix_socket_has_its_permissions_from_the_moment_it_exists(monkeypatch, perm, mode):
    """
    Even under umask 0 the file bind() creates is never more open than asked,
    then or once served (Twisted's UNIX port chmods its path as it starts
    listening); without permissions a socket is 0666, as Twisted's listenUNIX
    makes it in a single process.
    """
    import types

    seen = []

    class Watched(socket.socket):
        def bind(self, address):
            socket.socket.bind(self, address)
            seen.append(stat.S_IMODE(os.stat(address).st_mode))

    # Only the module under test sees the watched class.
    monkeypatch.setattr(sockets, "socket", types.SimpleNamespace(**dict(vars(socket), socket=Watched)))
    path = tempfile.mktemp(prefix="tp-mode-", suffix=".sock")
    previous = os.umask(0)
    try:
        sock = sockets.bind_socket(ListenSpec(path=path, perm=perm), 8)
        assert os.umask(0) == 0  # the process's umask is back
    finally:
        os.umask(previous)
    try:
        assert seen == [mode] and stat.S_IMODE(os.stat(path).st_mode) == mode
        port = sockets.adopt_port(MemoryReactorClock(), sock.fileno(), ServerFactory())
        assert stat.S_IMODE(os.stat(path).st_mode) == mode
        port.stopListening()
    finally:
        sock.close()
        os.unlink(path)


def test_cacheproxyctl_without_a_socket(capsys, tmp_path):
    missing = str(tmp_path / "none.sock")
    assert cli.main(["-s", missing, "status"]) == cli.EXIT_UNREACHABLE
    assert capsys.readouterr().err == (
        "cacheproxyctl: cannot connect to %s: no such socket (cannot reach the master: is it running, with"
        " this control path?)\n" % (missing,))
    stale = str(tmp_path / "stale.sock")
    sock = sockets.bind_socket(ListenSpec(path=stale, perm=0o600), 1)
    sock.close()  # the file stays, nobody listens
    assert cli.main(["-s", stale, "status"]) == cli.EXIT_UNREACHABLE
    assert "cannot connect to %s: connection refused (cannot reach the master" % (stale,) in capsys.readouterr().err


def ctl_as_nobody(path, *args):
    """C{cacheproxyctl -s PATH ARGS} in a process that imports it as root, then becomes nobody."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    script = ("import os, sys, grp, pwd, stat\n"
              "from twistedproxy.control import cli\n"
              "os.setgroups([]); os.setgid(%d); os.setuid(%d)\n"
              "sys.exit(cli.main(sys.argv[1:]))\n" % (nobody.pw_gid, nobody.pw_uid))
    return subprocess.run([sys.executable, "-c", script, "-s", path] + list(args), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, universal_newlines=True, env=processes.proxy_env(), timeout=30)


# -- a single process --------------------------------------------------------------------


def test_metrics_http_in_a_single_process(spawn, redis_backends):
    (backend,) = redis_backends(1)
    port, http_port, metrics_port, moved_port = free_port(), free_port(), free_port(), free_port()
    control = tempfile.mktemp(prefix="tp-ctl-", suffix=".sock")
    config = {"alpha": processes.pool_config([backend.port], port),
              "global": {"stats_http": "%s:%d" % (HOST, http_port), "metrics_http": "%s:%d" % (HOST, metrics_port),
                         "admin_token": OLD_TOKEN, "control": control, "control_mode": "0660"}}
    proc = spawn(processes.proxy, config, port)
    processes.wait_for_port(metrics_port, proc.proc)
    poll(lambda: os.path.exists(control), 10, 0.05, "the control socket")  # opened just after the stats
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o660
    check_read_only(metrics_port, http_port, OLD_TOKEN, 1)

    # A reload moves it (and rotates the token, as under a master).
    config["global"].update(metrics_http="%s:%d" % (HOST, moved_port), admin_token=NEW_TOKEN)
    path = proc.argv[proc.argv.index("-c") + 1]
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    proc.signal(signal.SIGHUP)
    poll(lambda: processes.listening(moved_port) and not processes.listening(metrics_port), 10, 0.05, "the metrics address to move")
    assert request(moved_port, "GET", "/metrics")[0] == 200
    assert request(http_port, "POST", "/tune", b"slowlog_threshold=0.5", token=OLD_TOKEN)[0] == 401
    assert slowlog_thresholds(http_port, NEW_TOKEN) == [0.01]


# -- under a master, through twistd --------------------------------------------------------


def test_admin_surface_under_a_master_through_twistd(spawn, memcached_backends, tmp_path):
    """twistd -n cacheproxy, 2 workers: read-only metrics, token rotation by SIGHUP, the control socket."""
    (backend,) = memcached_backends(1)
    port, http_port, metrics_port, moved_port = free_port(), free_port(), free_port(), free_port()
    config = master_config({"alpha": processes.pool_config([backend.port], port, redis=False)},
                           stats_http="%s:%d" % (HOST, http_port), metrics_http="%s:%d" % (HOST, metrics_port),
                           admin_token=OLD_TOKEN)
    control = config["global"]["control"]
    proc = spawn(processes.twistd, config, port)
    path = proc.argv[proc.argv.index("-c") + 1]

    def ready_workers():
        return ready_status(control, 2)

    poll(ready_workers, 30, 0.05, "2 ready workers")
    processes.wait_for_port(metrics_port, proc.proc)

    # The control socket: owner-only; another user is told why it cannot connect.
    assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
    if os.geteuid() == 0:
        result = ctl_as_nobody(control, "status")
        assert result.returncode == 2, result.stderr
        assert result.stderr == (
            "cacheproxyctl: cannot connect to %s: permission denied (the control socket is owner-only (0600,"
            " owner root); run as root or set its mode: global: control_mode: 0660 lets its group in)\n"
            % (control,))

    # The read-only address, served by the master from both workers' counters.
    check_read_only(metrics_port, http_port, OLD_TOKEN, 2)

    # Unauthenticated or wrongly authenticated POSTs change nothing anywhere.
    for token in (None, "wrong", OLD_TOKEN + "x", ""):
        status, headers, body = request(http_port, "POST", "/tune", b"slowlog_threshold=0.5", token=token)
        assert status == 401 and headers["www-authenticate"] == 'Bearer realm="twistedproxy"', (token, body)
    assert slowlog_thresholds(http_port, OLD_TOKEN) == [0.01, 0.01]

    # Rotation by SIGHUP: the old token is refused at once, the new one works on every worker;
    # the same reload moves the metrics address.
    config["global"].update(admin_token=NEW_TOKEN, metrics_http="%s:%d" % (HOST, moved_port))
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    before = ready_workers()["last_reload"]
    proc.signal(signal.SIGHUP)
    poll(lambda: (ready_workers() or {}).get("last_reload", before) != before, 20, 0.05, "the reload")
    assert ready_workers()["last_reload"]["ok"] is True
    status, _, body = request(http_port, "POST", "/tune", b"slowlog_threshold=0.5", token=OLD_TOKEN)
    assert status == 401, body
    status, _, body = request(http_port, "POST", "/tune", b"slowlog_threshold=0.25", token=NEW_TOKEN)
    assert status == 200 and [w["slowlog_threshold"] for w in json.loads(body)["workers"]] == [0.25, 0.25]
    poll(lambda: processes.listening(moved_port) and not processes.listening(metrics_port), 10, 0.05, "the metrics address to move")
    assert request(moved_port, "GET", "/metrics")[0] == 200
    assert request(moved_port, "POST", "/tune", b"slowlog_threshold=0.5", token=NEW_TOKEN)[0] == 405

    # A token file instead, by another reload; the token in the file is what counts.
    token_file = tmp_path / "admin.token"
    token_file.write_text("from-the-file\n")
    del config["global"]["admin_token"]
    config["global"]["admin_token_file"] = str(token_file)
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    before = ready_workers()["last_reload"]
    proc.signal(signal.SIGHUP)
    poll(lambda: (ready_workers() or {}).get("last_reload", before) != before, 20, 0.05, "the second reload")
    assert request(http_port, "POST", "/tune", b"", token=NEW_TOKEN)[0] == 401
    assert slowlog_thresholds(http_port, "from-the-file") == [0.01, 0.01]  # the reload applied the file's


def test_the_metrics_address_and_the_control_socket_through_an_upgrade(spawn, memcached_backends):
    """SIGUSR2: the new master serves the read-only address on the inherited socket, still read-only."""
    (backend,) = memcached_backends(1)
    port, metrics_port = free_port(), free_port()
    config = master_config({"mc": processes.pool_config([backend.port], port, redis=False)}, worker_processes=1,
                           metrics_http="%s:%d" % (HOST, metrics_port))
    master = Master(spawn, config, port)
    assert request(metrics_port, "GET", "/metrics")[0] == 200
    new_pid = master.upgrade(1)["pid"]
    try:
        assert new_pid != master.process.pid
        assert request(metrics_port, "GET", "/metrics")[0] == 200
        assert request(metrics_port, "POST", "/tune", b"slowlog_threshold=0.5")[0] == 405
        assert stat.S_IMODE(os.stat(master.control_path).st_mode) == 0o600  # the new master's socket
    finally:
        kill_pid(new_pid)
