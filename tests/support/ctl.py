"""
C{cacheproxyctl ARGS...} for the tests: as its own process, the way users run
it (exit codes, the entry point), or in this process, where a test sends many
commands and only their answers matter (PyPy takes most of a second to start an
interpreter).  Each gives (exit code, stdout, stderr).
"""

from __future__ import annotations

import io
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

from tests.support.processes import ROOT, proxy_env
from twistedproxy.control import cli

# The interpreter that runs cacheproxyctl: this one (the tests'), or the proxy's (the bench sets it).
PYTHON = sys.executable


def run(args, timeout: float = 60.0):
    """C{cacheproxyctl ARGS} as a process of its own (the checkout's, as the proxies the tests start run it)."""
    argv = [PYTHON, "-m", "twistedproxy.control.cli"] + list(args)
    out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                         env=proxy_env(), cwd=ROOT)
    return out.returncode, out.stdout, out.stderr


def run_here(args):
    """The same command's C{main} run in this process."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = cli.main(list(args))
        except SystemExit as e:  # argparse: usage errors and -h
            code = e.code
    return code, out.getvalue(), err.getvalue()


def cacheproxyctl(control: str, *args, timeout: float = 60.0):
    """C{cacheproxyctl -s CONTROL ARGS...} as a process of its own."""
    return run(["-s", control] + list(args), timeout)


def cacheproxyctl_here(control: str, *args):
    """C{cacheproxyctl -s CONTROL ARGS...} in this process."""
    return run_here(["-s", control] + list(args))
