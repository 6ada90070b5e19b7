"""
Real processes for integration tests: redis-server, memcached, nutcracker and the
proxy itself, each on a free loopback port, each stopped when the test ends.
"""

from __future__ import annotations

import atexit
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time

import yaml

HOST = "127.0.0.1"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_running = []


def _kill_leftovers():
    for proc in list(_running):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


atexit.register(_kill_leftovers)


# Ports the tests hand to the backends and proxies they start: below the kernel's
# ephemeral range (32768 and up here), never one the kernel hands out for bind(0)
# or for an outgoing connection, so nothing a test starts (a proxy's warm-up
# listening on port 0, a client connecting) can take a port meanwhile; and a band
# of their own per interpreter, since scripts/test.sh runs both suites at once,
# and a share of that per pytest-xdist worker when a suite runs in several.
_PORT_BANDS = {"CPython": (12000, 22000), "PyPy": (22000, 32000)}


def _worker_band(band, worker: str, count: str):
    """C{band} cut into C{count} equal shares, the share of xdist worker C{worker} ("gwN")."""
    if not worker.startswith("gw") or not count.isdigit():
        return band
    low, high = band
    share = (high - low) // int(count)
    index = int(worker[2:]) % int(count)
    return low + index * share, low + (index + 1) * share


_band = _worker_band(_PORT_BANDS.get(platform.python_implementation(), (12000, 32000)),
                     os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT", ""))
_next_port = [_band[0] + (os.getpid() * 7919) % (_band[1] - _band[0])]


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing uses right now: the next free one of
    this interpreter's band, in turn (a port comes back only after the whole
    band was handed out).
    """
    low, high = _band
    for _ in range(high - low):
        port = _next_port[0]
        _next_port[0] = low + (port + 1 - low) % (high - low)
        with socket.socket() as s:
            try:
                s.bind((HOST, port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port in %d..%d" % (low, high))


def listening(port: int, host: str = HOST) -> bool:
    """Whether something accepts connections on C{host:port} now."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def wait_for_port(port: int, proc=None, timeout: float = 10.0, host: str = HOST) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening on %d" % (proc.returncode, port))
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError("nothing listens on %s:%d after %ss" % (host, port, timeout))


class Process:
    """A started child process; C{stop()} ends it (SIGTERM, then SIGKILL)."""

    def __init__(self, argv, port=None, env=None, cwd=None, wait=True, log_path=None):
        self.argv = argv
        self.port = port
        self.log_path = log_path or tempfile.mktemp(prefix="tp-proc-", suffix=".log")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
        )
        _running.append(self.proc)
        if wait and port is not None:
            try:
                wait_for_port(port, self.proc)
            except Exception:
                self.stop()
                raise RuntimeError("%s failed to start:\n%s" % (argv[0], self.output()))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def signal(self, signum) -> None:
        self.proc.send_signal(signum)

    def freeze(self, timeout: float = 5.0) -> None:
        """SIGSTOP, and return only once every thread is stopped: delivery is asynchronous."""
        self.signal(signal.SIGSTOP)
        deadline = time.time() + timeout
        while not self._all_threads_stopped():
            if time.time() > deadline:
                raise RuntimeError("%s did not stop" % (self.argv[0],))
            time.sleep(0.005)

    def _all_threads_stopped(self) -> bool:
        task_dir = "/proc/%d/task" % self.pid
        try:
            for tid in os.listdir(task_dir):
                with open("%s/%s/stat" % (task_dir, tid)) as f:
                    # The state follows the command name in parentheses.
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("T", "t"):
                        return False
        except (OSError, IndexError):
            return False
        return True

    def thaw(self) -> None:
        self.signal(signal.SIGCONT)

    def output(self) -> str:
        if not self._log.closed:  # a failed start has already stopped (and closed) it
            self._log.flush()
        with open(self.log_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kb(self) -> int:
        """The process's resident set size in kB (VmRSS of /proc/<pid>/status)."""
        with open("/proc/%d/status" % self.pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS for pid %d" % self.pid)

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            try:
                self.thaw()
                self.proc.terminate()
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc in _running:
            _running.remove(self.proc)
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def redis_server(port=None, *extra) -> Process:
    port = port or free_port()
    argv = [
        "redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no",
        "--daemonize", "no", "--protected-mode", "no", "--dir", tempfile.gettempdir(),
    ] + list(extra)
    return Process(argv, port)


def memcached(port=None, *extra) -> Process:
    port = port or free_port()
    argv = ["memcached", "-l", HOST, "-p", str(port), "-U", "0", "-m", "64"] + list(extra)
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    return Process(argv, port)


def read_stats_port(port, timeout=5.0) -> dict:
    """What a twemproxy exporter does: connect, read until the server closes, parse."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)


def write_config(data: dict, directory=None) -> str:
    fd, path = tempfile.mkstemp(prefix="tp-conf-", suffix=".yml", dir=directory)
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f, sort_keys=False)
    return path


def nutcracker(config: dict, port: int) -> Process:
    path = write_config(config)
    stats = free_port()
    return Process(["nutcracker", "-c", path, "-s", str(stats), "-a", HOST, "-v", "4"], port)


def proxy(config: dict, port: int, python=None, extra_args=(), wait_port=True) -> Process:
    """The proxy as a real process (the C{cacheproxy} command) running C{config}."""
    path = write_config(config)
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    argv = [python or sys.executable, "-m", "twistedproxy.cli", "-c", path] + stats_args(extra_args)
    return Process(argv, port if wait_port else None, env=env, cwd=ROOT)


def stats_args(extra_args=()) -> list:
    """C{extra_args}, plus a free loopback stats port unless they name one (never 0.0.0.0:22222)."""
    extra_args = list(extra_args)
    if not any(a in ("-s", "--stats-port") or a.startswith("--stats-port=") for a in extra_args):
        extra_args += ["-s", str(free_port()), "-a", HOST]
    return extra_args


def proxy_env() -> dict:
    """The environment for a proxy child: the checkout first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def twistd(config: dict, port: int, python=None, extra_args=(), twistd_args=()) -> Process:
    """
    The proxy as C{twistd -n [twistd_args] cacheproxy -c FILE [extra_args]}, twistd
    from the interpreter's bin directory.
    """
    path = write_config(config)
    bindir = os.path.dirname(python or sys.executable)
    pidfile = tempfile.mktemp(prefix="tp-twistd-", suffix=".pid")
    argv = [os.path.join(bindir, "twistd"), "-n", "--pidfile", pidfile] + list(twistd_args) + ["cacheproxy", "-c", path]
    argv += stats_args(extra_args)
    return Process(argv, port, env=proxy_env(), cwd=ROOT)


def pool_config(servers, listen_port, redis=True, **keys) -> dict:
    """One pool's YAML dict: C{servers} are C{(port, weight)} or ports on 127.0.0.1."""
    lines = []
    for server in servers:
        port, weight = server if isinstance(server, tuple) else (server, 1)
        lines.append("%s:%d:%d" % (HOST, port, weight))
    pool = {"listen": "%s:%d" % (HOST, listen_port), "redis": redis, "servers": lines}
    pool.update(keys)
    return pool
