"""
The spare worker: a worker process started ahead of need, its interpreter up
and its modules imported, that takes the slot of the next worker to crash.

Why: in C{reuseport} mode each slot has a socket of its own, and the
connections the kernel queued on a crashed worker's socket wait for its
replacement to serve.  A process started then spends most of that wait
starting: PyPy's imports of the worker alone take 0.6-0.7 s here (Twisted's
C{defer}, AMP with pyOpenSSL), against 0.1 s of warm-up (bench/README.md, "The
crash wait").  The spare has paid for them before the crash.

It does not take a configuration ahead: what it is told when it takes a slot
(L{send_slot}) is the layout a worker started for that slot gets in its
environment, and from there it is that worker (the master's Hello answers it
with the configuration of the moment).  So reloads, rollovers and migrations
never need to reach a spare.

The layout's descriptors are positions in a list (L{placed}): the master
places them at fixed numbers in a child it starts, and sends them over the
spare's channel (SCM_RIGHTS) to a spare, which receives them at numbers of its
own.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import signal
import socket

# Subpackages of twistedproxy a worker runs code of, whatever its configuration.
_PRELOADED = ("config", "core", "hashing", "migration", "net", "protocols", "routes", "stats")
# Modules a worker imports as it starts serving, outside the package (pypyjit: PyPy's only).
_PRELOADED_OTHERS = ("ctypes", "encodings.idna", "twisted.internet.testing", "twisted.logger",
                     "twistedproxy.api")
_PRELOADED_IF_THERE = ("pypyjit",)
_MAX_DESCRIPTORS = 1024


def placed(layout: dict, numbers) -> dict:
    """
    C{layout} with its descriptors where they are: C{listen}'s values and
    C{mutex} are positions in the list of descriptors, and C{numbers} their
    numbers in the worker.
    """
    result = dict(layout)
    result["listen"] = {name: numbers[position] for name, position in layout["listen"].items()}
    if layout.get("mutex") is not None:
        result["mutex"] = numbers[layout["mutex"]]
    return result


def send_slot(sock: socket.socket, layout: dict, descriptors) -> None:
    """The master's side: give the spare at the other end of C{sock} its slot's C{layout} and C{descriptors}."""
    # One line, the descriptors with its first bytes: the spare reads up to the newline.
    socket.send_fds(sock, [json.dumps(layout).encode("utf-8") + b"\n"], list(descriptors))


def preload() -> None:
    """Import what a worker runs, so that taking a slot imports next to nothing."""
    for name in _PRELOADED:
        package = importlib.import_module("twistedproxy." + name)
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    for name in _PRELOADED_OTHERS:
        importlib.import_module(name)
    for name in _PRELOADED_IF_THERE:
        try:
            importlib.import_module(name)
        except ImportError:
            pass


def wait_for_slot(channel_fd: int):
    """
    The spare's side: block until the master gives a slot (L{send_slot}) on
    the channel C{channel_fd}; the layout with its descriptors placed, or None
    when the master closed the channel without one (it stops).
    """
    # The master signals every process of its own (SIGUSR1: reopen logs): a spare has nothing open.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    sock = socket.socket(fileno=channel_fd)
    try:
        data, descriptors, flags, _ = socket.recv_fds(sock, 65536, _MAX_DESCRIPTORS)
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError("more descriptors than %d for one worker" % (_MAX_DESCRIPTORS,))
        while data and not data.endswith(b"\n"):
            more = sock.recv(65536)
            data = data + more if more else b""  # closed mid-line: no slot
    finally:
        sock.detach()  # the channel stays open: the worker's AMP speaks on it next
    if not data:
        for fd in descriptors:
            os.close(fd)
        return None
    return placed(json.loads(data), descriptors)
