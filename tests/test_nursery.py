"""
twistedproxy.process.nursery: on PyPy the cacheproxy command's process (run
again in place: same pid) and every worker get PYPY_GC_NURSERY=8MB and
PYPY_GC_INCREMENT_STEP=1MB unless the operator set them; on CPython nothing
changes.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import redis

from tests.support import processes
from tests.support.processes import HOST, ROOT, free_port, pool_config
from twistedproxy.process import nursery

pytestmark = pytest.mark.integration
PYPY = sys.implementation.name == "pypy"


def _environ(pid: int) -> dict:
    with open("/proc/%d/environ" % pid, "rb") as f:
        items = [item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item]
    return {k.decode(): v.decode() for k, v in items}


def _serves(port):
    assert redis.Redis(host=HOST, port=port, socket_timeout=10, protocol=2).set("n", "v") is True


def _serving_environ(spawn, redis_backends, monkeypatch, named: dict) -> dict:
    """
    The environment of the process that serves (the one started, run again in
    place) for a proxy started with C{named}: setting -> the operator's value, or None for unset.
    """
    (backend,) = redis_backends(1)
    for name, value in named.items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    port = free_port()
    proc = spawn(processes.proxy, {"alpha": pool_config([backend.port], port)}, port)
    _serves(port)
    assert proc.alive()
    return _environ(proc.pid)


@pytest.mark.parametrize("operator", [None, "2MB"])
def test_the_command_runs_with_the_nursery_size(spawn, redis_backends, monkeypatch, operator):
    """The process that serves is the one started (run again in place), with the size in its environment."""
    environ = _serving_environ(spawn, redis_backends, monkeypatch, {nursery.ENV: operator})
    assert environ.get(nursery.ENV) == (operator or (nursery.SIZE if PYPY else None))


def test_workers_get_the_nursery_size_unless_the_environment_names_one():
    # (A worker's own /proc environ is overwritten by its title: the master's spawn environment is checked.)
    # (Each setting is given on its own: the marking step's is checked in the next test.)
    env = {}
    nursery.child_environ(env)
    assert {k: v for k, v in env.items() if k == nursery.ENV} == ({nursery.ENV: nursery.SIZE} if PYPY else {})
    env = {nursery.ENV: "2MB"}
    nursery.child_environ(env)
    assert env[nursery.ENV] == "2MB"


def test_workers_get_the_marking_step_unless_the_environment_names_one():
    env = {}
    nursery.child_environ(env)
    assert env == ({nursery.ENV: "8MB", nursery.STEP_ENV: "1MB"} if PYPY else {})
    env = {nursery.STEP_ENV: "4MB"}
    nursery.child_environ(env)
    assert env == ({nursery.ENV: "8MB", nursery.STEP_ENV: "4MB"} if PYPY else {nursery.STEP_ENV: "4MB"})


@pytest.mark.parametrize("operator", [None, "4MB"])
def test_the_command_runs_with_the_marking_step(spawn, redis_backends, monkeypatch, operator):
    """Missing only the marking step (the nursery size named) is enough to run the command again with it."""
    environ = _serving_environ(spawn, redis_backends, monkeypatch, {nursery.ENV: "2MB", nursery.STEP_ENV: operator})
    assert environ.get(nursery.ENV) == "2MB"
    assert environ.get(nursery.STEP_ENV) == (operator or (nursery.STEP if PYPY else None))


def test_reexec_runs_the_command_again_in_place():
    env = processes.proxy_env()
    env.pop(nursery.ENV, None)
    code = ("import os, sys\n"
            "from twistedproxy.process import nursery\n"
            "print(os.getpid(), flush=True)\n"
            "nursery.reexec([sys.executable, '-c', \"import os; print(os.getpid(), os.environ.get(%r))\"])\n"
            "print('not run again')\n" % (nursery.ENV,))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=60).stdout
    lines = out.split("\n")
    assert len(lines) > 1, out
    if PYPY:
        pid = lines[0]
        assert lines[1] == "%s %s" % (pid, nursery.SIZE)
    else:
        assert lines[1] == "not run again"
