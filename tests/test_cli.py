"""
The command line: C{cacheproxy -t/-V/-c} and the twistd plugin, from the
checkout and from a regular (non-editable) install of a wheel.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest
import redis
import yaml

from tests.support import processes
from tests.support.processes import HOST, ROOT, free_port, pool_config, write_config
from tests.support.workers import poll

pytestmark = pytest.mark.integration

GOOD = """\
alpha:
  listen: 127.0.0.1:22121
  redis: true
  hash: fnv1a_64
  distribution: ketama
  servers:
   - 127.0.0.1:6379:1
"""

# Line 4 names an unknown hash.
BAD = GOOD.replace("hash: fnv1a_64", "hash: nosuch")


def cacheproxy(*args, cwd=ROOT, env=None, python=None):
    """Run C{python -m twistedproxy.cli ARGS} (what the C{cacheproxy} script runs)."""
    return subprocess.run(
        [python or sys.executable, "-m", "twistedproxy.cli"] + list(args),
        capture_output=True,
        timeout=60,
        cwd=cwd,
        env=env if env is not None else processes.proxy_env(),
    )


def _file(text: str) -> str:
    fd, path = tempfile.mkstemp(prefix="tp-cli-", suffix=".yml")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return path


def test_test_conf_good_file():
    path = _file(GOOD)
    try:
        result = cacheproxy("-t", "-c", path)
    finally:
        os.unlink(path)
    assert result.returncode == 0, result
    out = result.stdout.decode()
    assert "syntax is ok" in out and path in out


def test_test_conf_bad_file_names_file_and_line():
    path = _file(BAD)
    try:
        result = cacheproxy("-t", "-c", path)
    finally:
        os.unlink(path)
    assert result.returncode == 1, result
    out = result.stdout.decode()
    assert "invalid" in out
    assert "%s:4:" % path in out and "nosuch" in out, out


def test_test_conf_missing_file():
    result = cacheproxy("-t", "-c", "/nonexistent/nutcracker.yml")
    assert result.returncode == 1
    assert "/nonexistent/nutcracker.yml" in result.stdout.decode()


def test_version():
    from twistedproxy import __version__

    result = cacheproxy("-V")
    assert result.returncode == 0
    assert ("twistedproxy-%s" % __version__) in result.stdout.decode()


def test_bad_option_is_a_usage_error():
    result = cacheproxy("--no-such-option")
    assert result.returncode == 2
    assert b"no-such-option" in result.stderr


def _serves(port: int, backend_port: int) -> None:
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    assert client.set("cli-key", "v") is True
    assert client.get("cli-key") == b"v"
    direct = redis.Redis(host=HOST, port=backend_port, socket_timeout=10, protocol=2)
    assert direct.get("cli-key") == b"v"


def test_cli_serves(spawn, redis_backends):
    (backend,) = redis_backends(1)
    port = free_port()
    proc = spawn(processes.proxy, {"alpha": pool_config([backend.port], port)}, port)
    _serves(port, backend.port)
    output = proc.output()
    assert "Traceback" not in output, output


def _answers(port) -> bool:
    try:
        return redis.Redis(host=HOST, port=port, socket_timeout=2, protocol=2).ping()
    except redis.RedisError:
        return False


def test_single_process_signals_reload_reopen_and_survive(spawn, redis_backends, tmp_path):
    """A plain twemproxy file (one process): HUP reopens the log (logrotate) and applies a changed file."""
    (backend,) = redis_backends(1)
    port, second = free_port(), free_port()
    log_path = tmp_path / "proxy.log"
    proc = spawn(processes.proxy, {"alpha": pool_config([backend.port], port)}, port,
                 extra_args=["-o", str(log_path), "-v", "7"])
    path = proc.argv[proc.argv.index("-c") + 1]
    _serves(port, backend.port)
    for signum in (signal.SIGUSR1, signal.SIGTTOU, signal.SIGTTIN, signal.SIGUSR2):
        proc.signal(signum)
    # logrotate: the file is moved away, then HUP makes the proxy write a new one.
    os.rename(str(log_path), str(log_path) + ".1")
    proc.signal(signal.SIGHUP)
    poll(log_path.exists, message="a new log file")
    # A changed file: a second pool starts listening; the first keeps its clients.
    client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
    assert client.set("before", "reload")
    with open(path, "w") as f:
        yaml.safe_dump({"alpha": pool_config([backend.port], port), "beta": pool_config([backend.port], second)}, f)
    proc.signal(signal.SIGHUP)
    poll(lambda: _answers(second), message="the new pool")
    assert client.get("before") == b"reload"
    # An invalid file changes nothing.
    with open(path, "a") as f:
        f.write("bogus: [\n")
    proc.signal(signal.SIGHUP)
    poll(lambda: "reload refused" in log_path.read_text(), message="the refusal")
    assert proc.alive() and _answers(port) and _answers(second)
    text = log_path.read_text()
    assert "reloaded" in text and "Traceback" not in text, text


def test_twistd_plugin_serves(spawn, redis_backends):
    """C{twistd -n cacheproxy -c FILE}, the plugin found through the checkout on PYTHONPATH."""
    (backend,) = redis_backends(1)
    port = free_port()
    proc = spawn(processes.twistd, {"alpha": pool_config([backend.port], port)}, port)
    _serves(port, backend.port)
    output = proc.output()
    assert "Traceback" not in output, output


def test_twistd_stdout_log_obeys_the_level(spawn, redis_backends):
    (backend,) = redis_backends(1)
    port = free_port()
    proc = spawn(processes.twistd, {"alpha": pool_config([backend.port], port)}, port, extra_args=["-v", "3"])
    _serves(port, backend.port)
    proc.signal(signal.SIGTTIN)  # error -> warn: still no info lines
    _serves(port, backend.port)
    output = proc.output()
    assert "starting on" not in output and "[-]" not in output, output


def test_twistd_log_file_obeys_the_level_and_rotates(spawn, redis_backends, tmp_path):
    (backend,) = redis_backends(1)
    port = free_port()
    log_path = tmp_path / "twistd.log"
    proc = spawn(processes.twistd, {"alpha": pool_config([backend.port], port)}, port,
                 extra_args=["-v", "4"], twistd_args=["--logfile", str(log_path)])
    _serves(port, backend.port)
    proc.signal(signal.SIGUSR2)  # a warning (single process: no upgrade), which -v 4 keeps
    poll(lambda: "needs a master" in log_path.read_text(), message="the warning")
    proc.signal(signal.SIGUSR1)  # twistd's log rotation still works
    poll(lambda: (tmp_path / "twistd.log.1").exists(), message="the rotated log")
    text = (tmp_path / "twistd.log.1").read_text()
    assert "starting on" not in text and "[-]" not in text, text


def test_twistd_bad_config_fails():
    path = write_config({"alpha": {"listen": "127.0.0.1:1", "hash": "nosuch", "servers": ["127.0.0.1:1:1"]}})
    try:
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "cacheproxy", "-c", path],
            capture_output=True,
            timeout=60,
            cwd=tempfile.gettempdir(),
            env=processes.proxy_env(),
        )
    finally:
        os.unlink(path)
    assert result.returncode != 0
    assert b"nosuch" in result.stdout + result.stderr


def _clean_env() -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env


@pytest.mark.timeout(120)
def test_plugin_from_a_wheel_install(tmp_path):
    """
    A regular install (a wheel, not the checkout) provides the twistd plugin and
    the C{cacheproxy} script.  The wheel goes into a fresh venv that sees the
    current environment's packages (Twisted ...) through a .pth file.
    """
    # Build from a copy: pip writes build/ and egg-info next to setup.cfg.
    source = tmp_path / "src"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", "bench", "tests"),
    )
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "--no-deps",
         "--no-build-isolation", "-w", str(wheels), str(source)],
        check=True,
        capture_output=True,
        timeout=90,
    )
    (wheel,) = wheels.glob("twistedproxy-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        env=_clean_env(),
    ).stdout.decode().strip()
    # Our dependencies come from the current environment (after the venv's own packages).
    parent = [p for p in sys.path if p.endswith("site-packages") and os.path.isdir(p) and p != purelib]
    with open(os.path.join(purelib, "zz-parent-env.pth"), "w") as f:
        f.write("\n".join(parent) + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-compile", "--no-deps",
         "--target", purelib, str(wheel)],
        check=True,
        capture_output=True,
        timeout=90,
    )
    elsewhere = str(tmp_path)
    env = _clean_env()
    where = subprocess.run(
        [python, "-c", "import twistedproxy; print(twistedproxy.__file__)"],
        check=True, capture_output=True, cwd=elsewhere, env=env,
    ).stdout.decode()
    assert where.startswith(purelib), where  # the wheel's copy, not the checkout's

    result = subprocess.run(
        [python, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
         "cacheproxy", "--help"],
        capture_output=True, timeout=60, cwd=elsewhere, env=env,
    )
    out = result.stdout.decode()
    assert result.returncode == 0, result
    for option in ("--conf-file", "--test-conf", "--stats-port", "--verbose"):
        assert option in out, out

    script = venv / "bin" / "cacheproxy"
    if not script.exists():  # pip --target puts scripts under the target dir
        script = os.path.join(purelib, "bin", "cacheproxy")
    conf = _file(GOOD)
    try:
        result = subprocess.run(
            [python, str(script), "-t", "-c", conf], capture_output=True, timeout=60, cwd=elsewhere, env=env
        )
    finally:
        os.unlink(conf)
    assert result.returncode == 0, result
    assert b"syntax is ok" in result.stdout


# -- nutcracker's command line ------------------------------------------------------


def _nutcracker(*args) -> str:
    """What the Debian nutcracker (0.5.0) prints for ARGS (it writes on standard error)."""
    result = subprocess.run(["nutcracker"] + list(args), capture_output=True, timeout=30)
    return (result.stdout + result.stderr).decode()


def test_help_names_every_nutcracker_option():
    import re

    theirs = set(re.findall(r"(-\w), (--[\w-]+)", _nutcracker("-h")))
    assert len(theirs) == 13, theirs
    for flag in ("-h", "-?"):
        result = cacheproxy(flag)
        assert result.returncode == 0, result
        ours = result.stdout.decode()
        for short, long in theirs:
            assert "%s, %s" % (short, long) in ours, (short, long, ours)


def test_describe_stats_as_nutcracker_does():
    result = cacheproxy("-D")
    assert result.returncode == 0, result
    ours = result.stdout.decode()
    theirs = _nutcracker("-D")
    assert ours[ours.index("\npool stats:"):] == theirs[theirs.index("\npool stats:"):]
    # Every field described is one the stats port serves, and the other way round.
    from twistedproxy.stats.snapshots import POOL_FIELDS, SERVER_FIELDS

    for field in POOL_FIELDS + SERVER_FIELDS:
        assert "\n  %s " % field in ours


@pytest.mark.parametrize("size, ok", [("512", True), ("16384", True), ("16777216", True),
                                      ("511", False), ("16777217", False), ("many", False)])
def test_mbuf_size_within_nutcracker_limits(size, ok):
    path = _file(GOOD)
    try:
        result = cacheproxy("-t", "-m", size, "-c", path)
        long_form = cacheproxy("-t", "--mbuf-size=%s" % size, "-c", path)
    finally:
        os.unlink(path)
    assert (result.returncode == 0) is ok, result
    assert long_form.returncode == result.returncode
    if not ok and size != "many":
        assert b"mbuf chunk size must be between 512 and 16777216 bytes" in result.stderr


def _nutcracker_line(config_path, port_stats, log_path, pid_path):
    """A nutcracker 0.5.0 command line, every option in its long or short form."""
    return ["--conf-file=%s" % config_path, "-s", str(port_stats), "--stats-addr=%s" % HOST,
            "-i", "1000", "--verbose=6", "-o", str(log_path), "--pid-file=%s" % pid_path, "-m", "32768"]


@pytest.mark.parametrize("launcher", ["cacheproxy", "twistd"])
def test_a_nutcracker_command_line_starts_the_proxy(launcher, redis_backends, tmp_path):
    """The same options nutcracker takes, with the program's name swapped; -p's file goes at exit."""
    (backend,) = redis_backends(1)
    port = free_port()
    path = write_config({"alpha": pool_config([backend.port], port)}, str(tmp_path))
    log_path, pid_path = tmp_path / "proxy.log", tmp_path / "proxy.pid"
    args = _nutcracker_line(path, free_port(), log_path, pid_path)
    if launcher == "twistd":
        argv = [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile", str(tmp_path / "t.pid"),
                "cacheproxy"] + args
    else:
        argv = [sys.executable, "-m", "twistedproxy.cli"] + args
    proc = processes.Process(argv, port, env=processes.proxy_env(), cwd=str(tmp_path))
    try:
        _serves(port, backend.port)
        assert poll(pid_path.exists, message="the pid file")
        assert pid_path.read_text() == "%d\n" % proc.pid
    finally:
        proc.stop()
    # twistd ends by the signal it got, as Twisted does.
    assert proc.proc.returncode == (-signal.SIGTERM if launcher == "twistd" else 0), proc.output()
    assert not pid_path.exists()
    assert "Traceback" not in log_path.read_text()


def test_twistd_refuses_daemonize_with_nodaemon():
    path = _file(GOOD)
    try:
        result = subprocess.run(
            [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "cacheproxy", "-d", "-c", path],
            capture_output=True, timeout=60, cwd=tempfile.gettempdir(), env=processes.proxy_env(),
        )
    finally:
        os.unlink(path)
    assert result.returncode != 0
    assert b"twistd daemonizes by itself; drop twistd's -n/--nodaemon" in result.stdout + result.stderr


def _session(pid: int) -> int:
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[3])


@pytest.mark.parametrize("workers", [0, 2])
def test_daemonize_detaches_writes_the_pid_file_serves_and_stops(workers, redis_backends, tmp_path):
    """-d as nutcracker does it: the command returns, the daemon has its own session in /, -p names it."""
    from tests.support.workers import pid_alive

    (backend,) = redis_backends(1)
    port = free_port()
    config = {"alpha": pool_config([backend.port], port)}
    if workers:
        config["global"] = {"worker_processes": workers}
    # Relative paths, as an operator types them: the daemon moves to / after reading them.
    write_path = write_config(config, str(tmp_path))
    args = ["-d", "-c", os.path.basename(write_path), "-p", "proxy.pid", "-o", "proxy.log",
            "-s", str(free_port()), "-a", HOST]
    started = cacheproxy(*args, cwd=str(tmp_path))
    assert started.returncode == 0, started
    pid_path = tmp_path / "proxy.pid"
    pid = int(poll(lambda: pid_path.exists() and pid_path.read_text().strip(), message="the pid file"))
    try:
        assert _session(pid) != _session(os.getpid())  # setsid, then a second fork (no terminal again)
        assert os.readlink("/proc/%d/cwd" % pid) == "/"
        processes.wait_for_port(port, timeout=20)
        _serves(port, backend.port)
        os.kill(pid, signal.SIGHUP)  # reopens the log and re-reads the file: both by absolute path
        log_text = (tmp_path / "proxy.log").read_text
        poll(lambda: "reopening log file" in log_text() and ("reloaded" in log_text() or "unchanged" in log_text()),
             message="the HUP")
        os.kill(pid, signal.SIGTERM)
        poll(lambda: not pid_alive(pid), 20, message="the daemon to exit")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert not pid_path.exists()
    text = (tmp_path / "proxy.log").read_text()
    assert "Traceback" not in text and "reload refused" not in text, text
