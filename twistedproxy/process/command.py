"""
What operators and init scripts see of a running proxy: the command line it
was started with (an upgrade runs the same one again), its process title
(nginx's C{cacheproxy: master process ...}), its pid file, and nutcracker's
C{-d} daemonizing.
"""

from __future__ import annotations

import os
import sys

# Where the operator started us: an upgrade runs the command line there (after
# -d the process itself sits in /, and relative paths of the command line
# would not resolve).
START_DIR = os.getcwd()

OLDBIN = ".oldbin"  # nginx's suffix for the pid file of a master being replaced


def package_root() -> str:
    """The folder holding the C{twistedproxy} package: children put it on their C{PYTHONPATH}."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def launch_argv() -> list:
    """
    The command that started this process, interpreter first, to run again
    (an upgrade): C{sys.orig_argv} where Python has it (3.10+: interpreter
    options kept), else rebuilt from C{sys.argv} (a script, or C{-m module}).
    """
    orig = getattr(sys, "orig_argv", None)
    if orig:
        return [sys.executable] + list(orig[1:])
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name] + sys.argv[1:]
    return [sys.executable] + sys.argv


def command_line() -> str:
    """
    The command line as the operator typed it, for titles: C{sys.argv} for a
    script (C{cacheproxy -c conf.yml}), the interpreter and C{-m module} too
    when run as a module.
    """
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None:
        return " ".join(launch_argv())
    return " ".join(sys.argv)


def set_title(title: str) -> bool:
    """Show C{title} as the process's command line (ps, pgrep -f, /proc/PID/cmdline); False without setproctitle."""
    try:
        from setproctitle import setproctitle
    except ImportError:
        return False
    try:
        setproctitle(title)
    except Exception:
        return False
    return True


def write_pid_file(path: str) -> None:
    """Write this process's pid to C{path}, as nutcracker's C{-p} does."""
    with open(path + ".tmp", "w") as f:
        f.write("%d\n" % os.getpid())
    os.replace(path + ".tmp", path)  # never a half-written file for a reader


def remove_pid_file(path: str) -> None:
    """Remove C{path} if it still names this process (a new master's pid stays)."""
    try:
        with open(path) as f:
            pid = f.read().strip()
        if pid == str(os.getpid()):
            os.unlink(path)
    except OSError:
        pass


_ready_fd = None  # a daemon's pipe to the command that started it (L{daemon_started})


def daemonize() -> None:
    """
    nutcracker's C{-d}: detach from the terminal and the session (fork,
    setsid, fork), work in C{/}, standard input and output to /dev/null.
    The starting command waits until the daemon has written its pid file and
    bound its sockets (L{daemon_started}): it exits 0 then, or 1 if the daemon
    ended first, so init scripts (systemd's Type=forking) find the pid file.
    """
    global _ready_fd
    read_end, write_end = os.pipe()
    if os.fork():
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            os._exit(0 if pipe.read() == b"ok" else 1)
    os.close(read_end)
    _ready_fd = write_end
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


def daemon_started() -> None:
    """A daemon serves: let the command that started it exit 0 (nothing without -d)."""
    global _ready_fd
    if _ready_fd is not None:
        fd, _ready_fd = _ready_fd, None
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)


def twistd_options(options):
    """twistd's own options when C{options} are C{cacheproxy}'s under twistd, else None."""
    twistd = getattr(options, "parent", None)
    try:
        twistd["nodaemon"]
    except (TypeError, KeyError):
        return None  # not under twistd (the cacheproxy command, a test)
    return twistd
