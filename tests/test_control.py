"""
The master's control socket: the blocking and Twisted clients and the
C{cacheproxyctl} command, against a real master with real workers.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile

import pytest
import pytest_twisted

from tests.support import ctl as ctl_support, processes
from tests.support.workers import Master, master_config, pid_alive, poll
from twistedproxy.control.client import ControlClient, ControlError

pytestmark = pytest.mark.integration


@pytest.fixture
def master(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    pool = processes.pool_config([backend[0].port], port, redis=False)
    return Master(spawn, master_config({"mc": pool}), port)


def ctl(master, *args, where=None, own_process=False):
    """
    C{cacheproxyctl -s CONTROL ARGS} (or C{WHERE ARGS}) against C{master}: its
    C{main} in this process, or with C{own_process} the command as users run it.
    """
    argv = (["-s", master.control_path] if where is None else where) + list(args)
    code, out, err = (ctl_support.run if own_process else ctl_support.run_here)(argv)
    return subprocess.CompletedProcess(argv, code, out, err)


def test_status_workers_log_level_and_reload(master):
    with master.control() as client:
        status = client.status()
        assert status["pid"] == master.process.pid
        assert status["worker_processes"] == 2 and len(status["workers"]) == 2
        assert status["config"] == master.path and len(status["config_digest"]) == 64
        assert status["last_reload"]["ok"] is None
        assert set(client.stats()) == {str(w["pid"]) for w in status["workers"]}

        master.signal(signal.SIGTTOU)  # one step quieter than the default (info)
        poll(lambda: client.status()["log_level"] == "warn", 5, message="SIGTTOU")
        master.signal(signal.SIGTTIN)
        poll(lambda: client.status()["log_level"] == "info", 5, message="SIGTTIN")
        master.signal(signal.SIGUSR1)  # reopen logs: nothing to reopen on stderr, must not hurt
        assert client.set_log_level("debug") == "debug"
        assert client.set_log_level("4") == "warn"
        with pytest.raises(ControlError):
            client.set_log_level("loud")
        assert client.status()["log_level"] == "warn"

        client.set_workers(3)
        master.wait_ready(3)
        old = {w["pid"] for w in client.status()["workers"]}
        client.set_workers(1)
        status = master.wait_ready(1)
        gone = old - {w["pid"] for w in status["workers"]}
        poll(lambda: not any(pid_alive(pid) for pid in gone), 10, message="removed workers to exit")
        with pytest.raises(ControlError):
            client.set_workers(0)

        assert client.reload()["ok"] is True
        assert client.status()["last_reload"]["ok"] is True
        with open(master.path, "a") as f:
            f.write("bogus_key: [\n")
        with pytest.raises(ControlError) as error:
            client.reload()
        assert master.path in str(error.value)
        assert client.status()["last_reload"]["ok"] is False


def test_cacheproxyctl_status_and_stop(master):
    result = ctl(master, "status", own_process=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == master.process.pid
    workers = master.worker_pids()
    result = ctl(master, "stop", own_process=True)
    assert result.returncode == 0 and "stopping" in result.stdout
    poll(lambda: not master.process.alive(), 10, 0.05, "the master to stop")
    assert not any(pid_alive(pid) for pid in workers)
    result = ctl(master, "status", own_process=True)
    assert result.returncode == 2 and "cannot reach" in result.stderr


@pytest_twisted.inlineCallbacks
def test_twisted_client(master):
    from twisted.internet import reactor

    client = yield ControlClient.connect(reactor, master.control_path)
    try:
        status = yield client.status()
        assert status["pid"] == master.process.pid
        answer = yield client.reload()
        assert answer["ok"] is True
        level = yield client.set_log_level("info")
        assert level == "info"
    finally:
        client.close()


SUBCOMMANDS = ("status", "stats", "reload", "upgrade", "stop", "workers", "log-level", "slowlog", "set")


def test_cacheproxyctl_exit_codes_and_help(master):
    # Usage errors: EX_USAGE (64), never 2 (which says "unreachable"), and nothing is sent.
    for args in ([], ["bogus"], ["workers", "many"], ["set", "timeout"], ["slowlog", "--limit", "x"]):
        result = ctl(master, *args, own_process=not args)
        assert result.returncode == 64, (args, result.stderr)
        assert "usage: cacheproxyctl" in result.stderr
    assert ctl(master, "status", where=[]).returncode == 64  # neither -s nor -c
    # Help for every subcommand: a sentence of its own, exit 0.
    result = ctl(master, "-h")
    assert result.returncode == 0 and "64 usage error" in result.stdout
    for name in SUBCOMMANDS:
        result = ctl(master, name, "-h")
        assert result.returncode == 0, name
        assert result.stdout.startswith("usage: cacheproxyctl %s" % (name,))
        description = result.stdout.split("\n\n")[1]
        assert description.rstrip().endswith(".") and len(description) > 40, (name, description)
    # Refused by the master, or failed on the workers: 1.
    assert ctl(master, "workers", "0").returncode == 1
    assert ctl(master, "log-level", "loud").returncode == 1
    result = ctl(master, "set", "timeout=250", "--pool", "nosuch")
    assert result.returncode == 1 and "no pool named 'nosuch'" in result.stderr
    assert json.loads(result.stdout)["workers"][0]["error"]  # the report is still printed
    result = ctl(master, "set", "timeout=250")
    assert result.returncode == 0, result.stderr
    # Unreachable: 2.
    assert ctl(master, "status", where=["-s", master.control_path + ".none"]).returncode == 2


def test_cacheproxyctl_conf_file_while_invalid(master):
    result = ctl(master, "status", where=["-c", master.path])
    assert result.returncode == 0 and result.stderr == ""
    with open(master.path) as f:
        good = f.read()
    # Invalid as a configuration (a bad value), then not even YAML: -c still finds the socket.
    for broken in (good + "\nextra:\n  listen: nowhere\n", good + "\nbogus_key: [\n"):
        with open(master.path, "w") as f:
            f.write(broken)
        result = ctl(master, "reload", where=["-c", master.path])
        assert result.returncode == 1 and master.path in result.stderr, result.stderr
        result = ctl(master, "status", where=["-c", master.path])
        assert result.returncode == 0, result.stderr
        assert "is not a valid configuration" in result.stderr and master.control_path in result.stderr
        status = json.loads(result.stdout)
        assert status["last_reload"]["ok"] is False and master.path in status["last_reload"]["error"]
    # A file that names no control socket: nothing to reach.
    with open(master.path, "w") as f:
        f.write("alpha: [\n")
    result = ctl(master, "status", where=["-c", master.path])
    assert result.returncode == 2 and "no global: control:" in result.stderr


# One log-level parser (twistedproxy.logs.parse_level) behind both commands:
# level names in any case, "warning", nutcracker's -v numbers 0..11.
LEVELS_GIVEN = (("warning", "warn"), ("ERROR", "error"), ("7", "debug"), ("info", "info"))


def _status_level(where) -> str:
    result = ctl(where, "status")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["log_level"]


def _check_both_level_commands(where, processes_count):
    for given, name in LEVELS_GIVEN:  # each differs from the one before
        result = ctl(where, "log-level", given)
        assert result.returncode == 0, (given, result.stderr)
        assert result.stdout.strip() == "log level: %s" % (name,)
        assert _status_level(where) == name
    for given, name in LEVELS_GIVEN:
        result = ctl(where, "set", "log_level=" + given)
        assert result.returncode == 0, (given, result.stderr)
        assert [w["log_level"] for w in json.loads(result.stdout)["workers"]] == [name] * processes_count
        assert _status_level(where) == name
    for bad in ("loud", "12"):
        assert ctl(where, "log-level", bad).returncode == 1
        result = ctl(where, "set", "log_level=" + bad)
        assert result.returncode == 1 and "log_level: unknown log level" in result.stderr, result.stderr
    assert _status_level(where) == "info"


def test_log_level_and_set_log_level_read_a_level_the_same_way(master):
    _check_both_level_commands(master, 2)


class _SingleProcess:
    """A proxy without workers, with a control socket."""

    def __init__(self, spawn, backend_port):
        self.port = processes.free_port()
        self.control_path = tempfile.mktemp(prefix="tp-ctl-", suffix=".sock")
        config = {"mc": processes.pool_config([backend_port], self.port, redis=False),
                  "global": {"control": self.control_path}}
        self.process = spawn(processes.proxy, config, self.port)
        # The control socket opens in the same reactor turn as the ports, just after them.
        poll(lambda: os.path.exists(self.control_path), 10, 0.01, "the control socket")


def test_a_single_process_answers_the_control_commands(spawn, memcached_backends):
    """The control endpoint drives an IProxyControl: the single process provides it too."""
    single = _SingleProcess(spawn, memcached_backends(1)[0].port)
    _check_both_level_commands(single, 1)
    status = json.loads(ctl(single, "status").stdout)
    assert status["pid"] == single.process.pid and status["worker_processes"] == 0
    assert set(json.loads(ctl(single, "stats").stdout)) == {str(single.process.pid)}
    assert json.loads(ctl(single, "slowlog").stdout) == []
    result = ctl(single, "set", "timeout=250", "--pool", "mc")
    assert result.returncode == 0 and json.loads(result.stdout)["workers"][0]["pools"]["mc"]["timeout"] == 250
    assert ctl(single, "reload").returncode == 0
    assert json.loads(ctl(single, "status").stdout)["last_reload"]["ok"] is True
    result = ctl(single, "workers", "2")
    assert result.returncode == 1 and "single process" in result.stderr
    result = ctl(single, "upgrade")
    assert result.returncode == 1 and "needs a master" in result.stderr
    assert ctl(single, "stop").returncode == 0
    poll(lambda: not single.process.alive(), 10, 0.05, "the proxy to stop")
    assert not os.path.exists(single.control_path)
