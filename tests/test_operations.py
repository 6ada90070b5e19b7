"""
What operators and init scripts rely on, with real processes: signals logged in
nutcracker's words (checked against nutcracker itself), the nginx-style upgrade
seen from outside (pid file, PIDFILE.oldbin, the operator's command line,
process titles, pgrep), the systemd unit, and scripts/demo.sh through an upgrade.
"""

from __future__ import annotations

import configparser
import os
import re
import shlex
import signal
import subprocess
import sys
import uuid

import pytest
import redis
import yaml

from tests.support import processes
from tests.support.processes import HOST, ROOT, free_port, pool_config, write_config
from tests.support.workers import (
    master_config,
    pid_alive,
    poll,
    process_title,
    ready_status,
    stop_new_masters,
)

pytestmark = pytest.mark.integration


def _answers(port) -> bool:
    try:
        return redis.Redis(host=HOST, port=port, socket_timeout=2, protocol=2).ping()
    except redis.RedisError:
        return False


def _signal_lines(text: str) -> list:
    return re.findall(r"(signal \d+ \(SIG\w+\) received[^\n]*)", text)


def _send_and_wait(pid, signum, log_text, after: str) -> str:
    """Send C{signum}, then wait for its line and the next line holding C{after}; the line sent."""
    before = len(_signal_lines(log_text()))
    os.kill(pid, signum)
    poll(lambda: len(_signal_lines(log_text())) > before, 20, message="the line of signal %d" % signum)
    line = _signal_lines(log_text())[before]
    if after:
        poll(lambda: after in log_text().split(line, 1)[1], 20, message="%r after %r" % (after, line))
    return line


def _nutcracker_lines(spawn, redis_backends, tmp_path) -> dict:
    """signal number -> the line the Debian nutcracker 0.5.0 logs for it."""
    (backend,) = redis_backends(1)
    port = free_port()
    path = write_config({"alpha": pool_config([backend.port], port)}, str(tmp_path))
    log_path = tmp_path / "nutcracker.log"
    proc = spawn(processes.Process, ["nutcracker", "-c", path, "-s", str(free_port()), "-a", HOST,
                                     "-o", str(log_path)], port)
    lines = {}
    # SIGHUP last: nutcracker logs its line, then closes and reopens the log
    # file, and the line of a signal that comes in between is written to the
    # closed file and lost (a suite under load waited 20 s for SIGUSR1's).
    for signum in (signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGUSR2, signal.SIGHUP):
        lines[signum] = _send_and_wait(proc.pid, signum, log_path.read_text, "")
    proc.stop()
    return lines


@pytest.mark.parametrize("workers", [0, 2])
def test_signals_are_logged_as_nutcracker_logs_them(workers, spawn, redis_backends, tmp_path):
    reference = _nutcracker_lines(spawn, redis_backends, tmp_path)
    assert reference[signal.SIGHUP] == "signal 1 (SIGHUP) received, reopening log file"
    (backend,) = redis_backends(1)
    port = free_port()
    config = {"alpha": pool_config([backend.port], port)}
    if workers:
        config = master_config(config, worker_processes=workers)
    log_path = tmp_path / "proxy.log"
    proc = spawn(processes.proxy, config, port, extra_args=["-o", str(log_path)])
    if workers:
        poll(lambda: log_path.read_text().count("_PoolFactory starting") >= workers, 20, message="the workers")
    # What nutcracker says, then what the proxy did.
    expected = [
        (signal.SIGHUP, "reloaded"),  # the file is applied again, unchanged or not
        (signal.SIGUSR1, "log files reopened"),
        (signal.SIGTTIN, "log level is now debug"),
        (signal.SIGTTOU, "log level is now info"),
    ]
    if not workers:
        expected.append((signal.SIGUSR2, "no upgrade: an upgrade (SIGUSR2) needs a master"))
    for signum, after in expected:
        line = _send_and_wait(proc.pid, signum, log_path.read_text, after)
        assert line == reference[signum], (line, reference[signum])
    assert _answers(port)
    proc.stop()
    assert proc.proc.returncode == 0
    text = log_path.read_text()
    assert "signal 15 (SIGTERM) received, exiting" in text
    assert "Traceback" not in text, text


@pytest.mark.parametrize("workers", [0, 1])
def test_sigint_exits_when_the_proxy_started_with_it_ignored(workers, spawn, redis_backends, tmp_path):
    """
    A shell starts a background job with SIGINT ignored, and Python and Twisted
    then leave it so; the proxy logs "exiting" for it, as nutcracker does, and
    exits, as nutcracker does, single process and master alike.
    """
    (backend,) = redis_backends(1)
    port = free_port()
    config = {"alpha": pool_config([backend.port], port)}
    if workers:
        config = master_config(config, worker_processes=workers)
    path = write_config(config, str(tmp_path))
    log_path = tmp_path / "proxy.log"
    command = [sys.executable, "-m", "twistedproxy.cli", "-c", path, "-o", str(log_path)]
    command += processes.stats_args()
    argv = ["sh", "-c", "trap '' INT; exec " + shlex.join(command)]
    proc = spawn(processes.Process, argv, port, env=processes.proxy_env(), cwd=ROOT)
    assert poll(lambda: _answers(port), 20, message="the proxy's answer")  # a master listens before its workers serve
    proc.signal(signal.SIGINT)
    assert poll(lambda: proc.proc.poll() is not None, 20, message="the proxy's exit")
    assert proc.proc.returncode == 0
    text = log_path.read_text()
    assert "signal 2 (SIGINT) received, exiting" in text
    assert "Traceback" not in text, text


def test_master_logs_the_upgrade_signal_and_what_followed(spawn, redis_backends, tmp_path):
    (backend,) = redis_backends(1)
    port = free_port()
    log_path = tmp_path / "proxy.log"
    config = master_config({"alpha": pool_config([backend.port], port)})
    proc = spawn(processes.proxy, config, port, extra_args=["-o", str(log_path)])
    poll(lambda: log_path.read_text().count("_PoolFactory starting") >= 2, 20, message="the workers")
    try:
        line = _send_and_wait(proc.pid, signal.SIGUSR2, log_path.read_text, "upgrade: new master")
        assert line == "signal 12 (SIGUSR2) received"
        poll(lambda: not proc.alive(), 30, message="the old master to leave")
        assert re.search(r"upgrade: new master \d+ serves", log_path.read_text())
        assert _answers(port)
    finally:
        stop_new_masters(proc.argv[proc.argv.index("-c") + 1], proc.pid)


# -- upgrade, as operators see it ------------------------------------------------------


def _pgrep(pattern: str) -> set:
    result = subprocess.run(["pgrep", "-f", pattern], capture_output=True, timeout=30)
    return {int(pid) for pid in result.stdout.split()}


def _read_pid(path):
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return int(text) if text.strip().isdigit() else None


def _check_titles(status, conf_name):
    master = process_title(status["pid"])
    assert master.startswith("cacheproxy: master process "), master
    assert "cacheproxy -c %s" % conf_name in master, master
    for worker in status["workers"]:
        title = process_title(worker["pid"])
        assert title == "cacheproxy: worker process %d" % worker["slot"], title  # no JSON on it


@pytest.mark.parametrize("launcher", ["cacheproxy", "twistd"])
def test_upgrade_pid_file_oldbin_titles_and_command_line(launcher, redis_backends, tmp_path):
    """
    The operator's command line (relative paths), a pid file: after USR2 the pid
    file names the new master, the old one's pid is in PIDFILE.oldbin until it
    leaves, and the new master runs the same command line (pgrep -f finds it).
    """
    (backend,) = redis_backends(1)
    port = free_port()
    conf_name = "ops-%s.yml" % uuid.uuid4().hex[:8]
    config = master_config({"alpha": pool_config([backend.port], port)})
    control = config["global"]["control"]
    with open(str(tmp_path / conf_name), "w") as f:
        yaml.safe_dump(config, f)
    args = ["-c", conf_name, "-p", "proxy.pid", "-o", "proxy.log", "-s", str(free_port()), "-a", HOST]
    bindir = os.path.dirname(sys.executable)
    if launcher == "twistd":
        argv = [os.path.join(bindir, "twistd"), "-n", "--pidfile", "twistd.pid", "cacheproxy"] + args
    else:
        # What pip's console script is: the interpreter running twistedproxy.cli:main.
        script = tmp_path / "cacheproxy"
        script.write_text("#!%s\nimport sys\nfrom twistedproxy.cli import main\nsys.exit(main())\n" % sys.executable)
        script.chmod(0o755)
        argv = [str(script)] + args
    pid_path, oldbin = tmp_path / "proxy.pid", tmp_path / "proxy.pid.oldbin"
    proc = processes.Process(argv, port, env=processes.proxy_env(), cwd=str(tmp_path))
    try:
        old = poll(lambda: ready_status(control, 2), 30, message="2 workers")
        assert old["pid"] == proc.pid
        assert _read_pid(pid_path) == proc.pid
        _check_titles(old, conf_name)
        pattern = "cacheproxy -c %s" % conf_name
        assert _pgrep(pattern) == {proc.pid}

        proc.signal(signal.SIGUSR2)
        # While the new master starts: the old pid is in .oldbin.
        poll(lambda: _read_pid(oldbin) == proc.pid, 20, 0.005, message="PIDFILE.oldbin")
        if launcher == "twistd":
            # Moved right after the -p file, by a second rename: polled too, since
            # a master descheduled between the two (a suite under load) is not yet there.
            poll(lambda: _read_pid(tmp_path / "twistd.pid.oldbin") == proc.pid, 20, 0.005,
                 message="twistd's PIDFILE.oldbin")
        poll(lambda: not proc.alive(), 30, message="the old master to leave")
        new_pid = _read_pid(pid_path)
        assert new_pid and new_pid != proc.pid and pid_alive(new_pid)
        poll(lambda: not oldbin.exists(), 10, message="PIDFILE.oldbin removed")
        if launcher == "twistd":
            assert _read_pid(tmp_path / "twistd.pid") == new_pid
            poll(lambda: not (tmp_path / "twistd.pid.oldbin").exists(), 10, message="twistd's .oldbin removed")
        new = poll(lambda: ready_status(control, 2), 30, message="the new master's workers")
        assert new["pid"] == new_pid
        _check_titles(new, conf_name)
        assert argv[0] in process_title(new_pid) and " ".join(args) in process_title(new_pid)
        assert _pgrep(pattern) == {new_pid}
        assert _answers(port)

        os.kill(new_pid, signal.SIGTERM)
        poll(lambda: not pid_alive(new_pid), 20, message="the new master to stop")
        assert not pid_path.exists()
        if launcher == "twistd":
            assert not (tmp_path / "twistd.pid").exists()
    finally:
        proc.stop()
        stop_new_masters(conf_name, proc.pid)
    text = (tmp_path / "proxy.log").read_text()
    assert "Traceback" not in text, text


def test_failed_upgrade_gives_the_pid_file_back(spawn, redis_backends, tmp_path):
    (backend,) = redis_backends(1)
    port = free_port()
    pid_path = tmp_path / "proxy.pid"
    log_path = tmp_path / "proxy.log"
    config = master_config({"alpha": pool_config([backend.port], port)})
    proc = spawn(processes.proxy, config, port, extra_args=["-p", str(pid_path), "-o", str(log_path)])
    poll(lambda: ready_status(config["global"]["control"], 2), 30, message="2 workers")
    path = proc.argv[proc.argv.index("-c") + 1]
    with open(path, "a") as f:
        f.write("broken: [\n")  # the new master cannot start on this
    proc.signal(signal.SIGUSR2)
    poll(lambda: "upgrade failed" in log_path.read_text(), 30, message="the failed upgrade")
    assert _read_pid(pid_path) == proc.pid
    assert not (tmp_path / "proxy.pid.oldbin").exists()
    assert proc.alive() and _answers(port)


# -- the systemd unit ---------------------------------------------------------------------


def test_systemd_unit_agrees_with_the_pid_file_behaviour():
    """
    systemd is not running here: the unit is read as systemd reads it, and its
    lines checked against what the proxy does (tested above and in test_cli.py).
    """
    path = os.path.join(ROOT, "conf", "twistedproxy.service")
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd's keys are case-sensitive
    unit.read(path)
    service = unit["Service"]
    start = shlex.split(service["ExecStart"])
    # Type=forking: the daemon (-d) is ready once the command returns (it waits for the
    # pid file and the sockets), and systemd takes MAINPID from PIDFile: the file -p writes.
    assert service["Type"] == "forking"
    assert os.path.basename(start[0]) == "cacheproxy" and "-d" in start
    assert start[start.index("-p") + 1] == service["PIDFile"]
    # The configuration it checks first is the one it runs.
    check = shlex.split(service["ExecStartPre"])
    assert "-t" in check and check[check.index("-c") + 1] == start[start.index("-c") + 1]
    # Reload is the master's HUP; MAINPID is the master the pid file names, after an upgrade
    # too (the new master writes PIDFile before the old one leaves).
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    # Stop: QUIT (graceful) to the master alone, which stops its workers.
    assert service["KillSignal"] == "SIGQUIT" and service["KillMode"] == "mixed"
    # The upgrade the unit documents is a USR2 to that same master, naming the .oldbin file.
    with open(path) as f:
        text = f.read()
    assert "kill -USR2 $MAINPID" in text
    assert "kill -USR2 $(cat %s)" % service["PIDFile"] in text
    assert os.path.basename(service["PIDFile"]) + ".oldbin" in text
    # Every option the unit passes is one the command takes.
    result = subprocess.run([sys.executable, "-m", "twistedproxy.cli", "--help"], capture_output=True,
                            timeout=60, env=processes.proxy_env())
    for arg in start[1:] + check[1:]:
        if arg.startswith("-"):
            assert re.search(r"%s, --" % re.escape(arg), result.stdout.decode()), arg


# -- scripts/demo.sh through an upgrade ------------------------------------------------------


def _demo_config(tmp_path) -> tuple:
    """conf/demo.yml on free ports: (path, redis pool port, backend ports, control path)."""
    with open(os.path.join(ROOT, "conf", "demo.yml")) as f:
        config = yaml.safe_load(f)
    backends = {"redis": [free_port(), free_port()], "memcache": [free_port(), free_port()]}
    for name, ports in backends.items():
        pool = config[name]
        pool["listen"] = "%s:%d" % (HOST, free_port())
        pool["servers"] = ["%s:%d:1 %s" % (HOST, port, server.split()[-1])
                           for port, server in zip(ports, pool["servers"])]
    config["global"]["worker_processes"] = 2
    config["global"]["control"] = str(tmp_path / "demo.ctl")
    config["global"]["stats_http"] = "%s:%d" % (HOST, free_port())
    path = tmp_path / "demo.yml"
    with open(str(path), "w") as f:
        yaml.safe_dump(config, f)
    return str(path), int(config["redis"]["listen"].rsplit(":", 1)[1]), backends, config["global"]["control"]


@pytest.mark.timeout(180)
def test_demo_follows_the_master_through_an_upgrade(tmp_path):
    conf, port, backends, control = _demo_config(tmp_path)
    run = tmp_path / "run"
    env = processes.proxy_env()
    env.update({
        "DEMO_PROXY": "%s -m twistedproxy.cli" % sys.executable,  # this checkout, this interpreter
        "DEMO_CONF": conf,
        "DEMO_REDIS_PORTS": " ".join(map(str, backends["redis"])),
        "DEMO_MEMCACHED_PORTS": " ".join(map(str, backends["memcache"])),
        "DEMO_STATS_PORT": str(free_port()),
        "DEMO_RUN": str(run),
    })
    out = open(str(tmp_path / "demo.out"), "wb")
    demo = subprocess.Popen(["bash", os.path.join(ROOT, "scripts", "demo.sh")], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    pid_path = run / "cacheproxy.pid"
    everything = []
    try:
        processes.wait_for_port(port, demo, timeout=90)
        old = poll(lambda: ready_status(control, 2), 30, message="2 workers")
        assert _read_pid(pid_path) == old["pid"]
        client = redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2)
        assert client.set("demo", "survives")

        os.kill(old["pid"], signal.SIGUSR2)
        poll(lambda: not pid_alive(old["pid"]), 60, message="the old master to leave")
        new_pid = _read_pid(pid_path)
        assert new_pid and new_pid != old["pid"]
        new = poll(lambda: ready_status(control, 2), 30, message="the new master's workers")
        assert new["pid"] == new_pid
        # The demo still runs, and so do its backends: the value is still there.
        assert demo.poll() is None
        assert redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2).get("demo") == b"survives"
        assert all(processes.listening(p) for ports in backends.values() for p in ports)
        everything = [new_pid] + [w["pid"] for w in new["workers"]]

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) is not None
        poll(lambda: not any(pid_alive(pid) for pid in everything), 20, message="the proxy to stop")
        poll(lambda: not any(processes.listening(p) for ports in backends.values() for p in ports), 20,
             message="the backends to stop")
        assert not processes.listening(port) and not pid_path.exists()
    finally:
        if demo.poll() is None:
            demo.kill()
        try:
            os.killpg(demo.pid, signal.SIGKILL)  # anything the demo left behind
        except ProcessLookupError:
            pass
        for pid in everything:
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()
    text = (tmp_path / "demo.out").read_text()
    assert "Traceback" not in text, text
