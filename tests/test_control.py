"""
The master's control socket: the blocking and Twisted clients and the
C{cacheproxyctl} command, against a real master with real workers.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
import pytest_twisted

from tests.support import processes
from tests.support.workers import Master, master_config, pid_alive, poll
from twistedproxy.control.client import ControlClient, ControlError

pytestmark = pytest.mark.integration


@pytest.fixture
def master(spawn, memcached_backends):
    backend = memcached_backends(1)
    port = processes.free_port()
    pool = processes.pool_config([backend[0].port], port, redis=False)
    return Master(spawn, master_config({"mc": pool}), port)


def ctl(master, *args):
    argv = [sys.executable, "-m", "twistedproxy.control.cli", "-s", master.control_path] + list(args)
    return subprocess.run(argv, capture_output=True, text=True, cwd=processes.ROOT, env=processes.proxy_env(),
                          timeout=30)


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
    result = ctl(master, "status")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == master.process.pid
    workers = master.worker_pids()
    result = ctl(master, "stop")
    assert result.returncode == 0 and "stopping" in result.stdout
    poll(lambda: not master.process.alive(), 10, 0.05, "the master to stop")
    assert not any(pid_alive(pid) for pid in workers)
    result = ctl(master, "status")
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
