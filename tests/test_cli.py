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
