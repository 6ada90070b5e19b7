"""
Helpers for tests of the master + workers model: a proxy with a C{global:}
section and a control socket, memcached-protocol traffic that knows which
worker served each connection (the C{STAT pid} line), and pid polling.
"""

from __future__ import annotations

import os
import signal
import socket
import tempfile
import threading
import time

from tests.support import processes
from twistedproxy.control.client import BlockingControlClient

HOST = processes.HOST


def poll(predicate, timeout: float = 10.0, interval: float = 0.02, message: str = "condition"):
    """C{predicate()}'s first true value within C{timeout} seconds, else AssertionError."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.time() >= deadline:
            raise AssertionError("timed out after %ss waiting for %s" % (timeout, message))
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    """Whether C{pid} runs (a zombie, as left by a parent that is gone, counts as dead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def ready_status(control_path: str, count: int, generation=None):
    """
    The status from the control socket at C{control_path} when exactly C{count} of the master's
    workers (of C{generation}, if given) are ready, else None (also while the socket does not answer).
    """
    try:
        with BlockingControlClient(control_path) as ctl:
            status = ctl.status()
    except OSError:
        return None
    ready = [w for w in status["workers"] if w["state"] == "ready"
             and (generation is None or w["generation"] == generation)]
    return status if len(ready) == count else None


def master_config(pools: dict, **global_keys) -> dict:
    """A configuration with C{pools} and a global section (control socket in a temp dir)."""
    glob = {"worker_processes": 2, "worker_shutdown_timeout": 3,
            "control": tempfile.mktemp(prefix="tp-ctl-", suffix=".sock")}
    glob.update(global_keys)
    config = dict(pools)
    config["global"] = glob
    return config


class Master:
    """A proxy master as a real process, with its control socket."""

    def __init__(self, spawn, config: dict, port: int, extra_args=()):
        self.config = config
        self.control_path = config["global"]["control"]
        self.path = None
        self.process = spawn(self._start, config, port, extra_args)
        self.status = self.wait_ready(config["global"]["worker_processes"])

    def _start(self, config, port, extra_args):
        proc = processes.proxy(config, port, extra_args=extra_args)
        self.path = proc.argv[proc.argv.index("-c") + 1]
        return proc

    def control(self) -> BlockingControlClient:
        return BlockingControlClient(self.control_path)

    def current_status(self) -> dict:
        with self.control() as ctl:
            return ctl.status()

    def wait_ready(self, count: int, timeout: float = 20.0, generation=None) -> dict:
        """The status once C{count} workers of the current (or given) generation are ready."""

        def ready():
            status = ready_status(self.control_path, count, generation)
            return status if status and len(status["workers"]) == count else None

        return poll(ready, timeout, 0.05, "%d ready workers" % count)

    def upgrade(self, workers: int) -> dict:
        """
        SIGUSR2; the new master's status once this master has exited and
        C{workers} serve.  If that does not happen in time, the new master is
        stopped before the failure is raised: it is not the test's child, and
        nothing else would stop it (a suite under load once left one running).
        """
        self.signal(signal.SIGUSR2)
        try:
            poll(lambda: not self.process.alive(), 20, 0.05, "the old master to exit")
            return self.wait_ready(workers)
        except AssertionError:
            stop_new_masters(self.path, self.process.pid)
            raise

    def worker_pids(self) -> set:
        return {w["pid"] for w in self.current_status()["workers"]}

    def write_config(self, config: dict) -> None:
        import yaml

        with open(self.path + ".tmp", "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
        os.replace(self.path + ".tmp", self.path)

    def signal(self, signum) -> None:
        self.process.signal(signum)


def read_reply(sock, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed by the proxy")
        data += chunk
    return data


def served_by(sock) -> int:
    """The pid of the worker serving this memcached-protocol connection."""
    sock.sendall(b"stats\r\n")
    for line in read_reply(sock, b"END\r\n").split(b"\r\n"):
        if line.startswith(b"STAT pid "):
            return int(line.split()[2])
    raise AssertionError("no STAT pid line")


def connect(port: int, timeout: float = 5.0):
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def set_get(sock, key: bytes, value: bytes) -> None:
    """One set and one get of C{key}; raises unless both answer as memcached would."""
    sock.sendall(b"set %s 0 0 %d\r\n%s\r\nget %s\r\n" % (key, len(value), value, key))
    reply = read_reply(sock, b"END\r\n")
    expected = b"STORED\r\nVALUE %s 0 %d\r\n%s\r\nEND\r\n" % (key, len(value), value)
    if reply != expected:
        raise AssertionError("unexpected reply %r" % (reply[:200],))


class Traffic(threading.Thread):
    """
    Memcached-protocol load on the proxy at C{port} until L{stop}: C{connections}
    persistent connections served round-robin, or (C{reconnect}) a new
    connection for every set+get.  Errors are kept per serving worker pid.
    """

    def __init__(self, port: int, connections: int = 10, reconnect: bool = False, pause: float = 0.0):
        threading.Thread.__init__(self, daemon=True)
        self.port = port
        self.count = connections
        self.reconnect = reconnect
        self.pause = pause
        self.running = True
        self.errors = []  # (pid or None, error text)
        self.requests = 0
        self.pids = set()

    def run(self):
        conns = []
        if not self.reconnect:
            for _ in range(self.count):
                sock = connect(self.port)
                conns.append([sock, served_by(sock)])
                self.pids.add(conns[-1][1])
        n = 0
        while self.running:
            n += 1
            key = b"k%d" % (n % 500)
            if self.reconnect:
                try:
                    with connect(self.port) as sock:
                        set_get(sock, key, b"v%d" % n)
                    self.requests += 1
                except Exception as e:
                    self.errors.append((None, repr(e)))
            else:
                entry = conns[n % len(conns)]
                try:
                    set_get(entry[0], key, b"v%d" % n)
                    self.requests += 1
                except Exception as e:
                    self.errors.append((entry[1], repr(e)))
                    entry[0].close()
                    try:
                        entry[0] = connect(self.port)
                        entry[1] = served_by(entry[0])
                        self.pids.add(entry[1])
                    except Exception as e2:
                        self.errors.append((None, repr(e2)))
            if self.pause:
                time.sleep(self.pause)
        for sock, _ in conns:
            sock.close()

    def stop(self):
        self.running = False
        self.join(10)
        assert not self.is_alive()


def process_title(pid: int) -> str:
    """What C{ps} shows for C{pid}: its command line, or the title a proxy process set."""
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return f.read().replace(b"\0", b" ").decode().strip()


def masters_of(config_path: str) -> list:
    """The pids of the masters running the configuration file C{config_path} (their titles name it)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            title = process_title(int(name))
        except (OSError, UnicodeDecodeError):
            continue  # gone meanwhile, or not ours
        if title.startswith("cacheproxy: master process") and config_path in title.split():
            found.append(int(name))
    return found


def stop_new_masters(config_path: str, old_pid: int) -> None:
    """
    Stop every master running C{config_path} but C{old_pid} (the test's own
    child): the new master an upgrade started is nobody's child, and a test
    that failed before it learnt that master's pid left it running with its
    workers (a suite under load did).
    """
    for pid in masters_of(config_path):
        if pid != old_pid:
            kill_pid(pid)


def kill_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM C{pid} (not our child: e.g. an upgraded master), SIGKILL if it lingers."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        poll(lambda: not pid_alive(pid), timeout, 0.05, "pid %d to exit" % pid)
    except AssertionError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
