"""
The spare worker: a worker process started ahead of need, its modules
imported and its request path warmed up, that takes the slot of the next
worker to crash.

Why: in C{reuseport} mode each slot has a socket of its own, and the
connections the kernel queued on a crashed worker's socket wait for its
replacement to serve.  A process started then spends most of that wait
starting: PyPy's imports of the worker alone take 0.6-0.7 s here (Twisted's
C{defer}, AMP with pyOpenSSL), against 0.1 s of warm-up (bench/README.md, "The
crash wait").  And a replacement warms up for 0.1 s only, so PyPy's JIT
compiles the rest in its first second of traffic.  The spare has paid for both
before the crash: it imports what a worker runs (L{preload}), then warms up on
the pools of the master's configuration file (L{Standby}), as a worker does at
start.

It takes no configuration ahead: what it gets when it takes a slot
(L{SpareChannel.give}) is the layout a worker started for that slot gets in
its environment, and from there it is that worker (the master's Hello answers
it with the configuration of the moment, and it warms up again for the
replacement's 0.1 s on that).  So reloads, rollovers and migrations never need
to reach a spare; a file that changed since the spare read it only makes its
warm-up less apt.

The channel, before AMP speaks on it: the spare writes L{WARM} once warm (the
master gives a slot only to a warm spare, and starts a new process
otherwise), the master writes one line, the slot's layout, with the slot's
sockets (SCM_RIGHTS).  The layout's descriptors are positions in that list
(L{placed}): a worker started for a slot gets them at fixed numbers instead.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import socket

from twisted.internet.defer import maybeDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.logger import Logger

log = Logger()

WARM = b"warm\n"  # the spare to the master: warmed up, ready for a slot

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


class SpareChannel:
    """The master's end of a spare's channel, until the spare takes a slot."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.heard = b""

    def warm(self) -> bool:
        """Whether the spare said it is warm (OSError if it closed the channel)."""
        while self.heard != WARM:
            try:
                data = self.sock.recv(len(WARM) - len(self.heard), socket.MSG_DONTWAIT)
            except BlockingIOError:
                return False
            if not data:
                raise ConnectionResetError("the spare closed its channel")
            self.heard += data
        return True

    def give(self, layout: dict, descriptors) -> socket.socket:
        """
        Give the spare its slot's C{layout} and C{descriptors}; the socket,
        for AMP from now on.
        """
        # One line, the descriptors with its first bytes: the spare reads up to the newline.
        socket.send_fds(self.sock, [json.dumps(layout).encode("utf-8") + b"\n"], list(descriptors))
        return self.sock

    def close(self) -> None:
        self.sock.close()


class Standby:
    """
    A spare's life until it has a slot, in its reactor: warm up on the
    master's configuration file (C{layout["config"]}), say L{WARM}, then read
    the slot's layout; C{take(layout)} (its descriptors placed) makes it that
    slot's worker.  The master closing the channel stops the reactor.
    """

    def __init__(self, reactor, layout: dict, take, warm_up):
        self.reactor = reactor
        self.fd = layout["channel"]
        self.config_path = layout.get("config")
        self.take = take
        self.warm_up = warm_up  # config -> a Deferred (twistedproxy.api.warm_up)
        self.data = b""
        self.descriptors = []
        self.leaving = False  # the process is shutting down (SIGTERM, SIGQUIT, the master gone)

    def start(self) -> None:
        self.reactor.addSystemEventTrigger("before", "shutdown", self._leave)
        maybeDeferred(self._warm_up).addErrback(
            lambda failure: log.failure("spare worker {pid}: warm-up failed", failure, pid=os.getpid())
        ).addCallback(lambda _: self._warm())

    def _warm_up(self):
        from twistedproxy.config import ConfigError, load_config_text

        try:
            _, config = load_config_text(self.config_path)
        except (ConfigError, OSError) as e:
            log.warn("spare worker {pid}: no warm-up ({error})", pid=os.getpid(), error=str(e))
            return None
        return self.warm_up(config).addCallback(self._warmed)

    def _warmed(self, report) -> None:
        if report is not None:
            log.info("spare worker {pid} {warm}", pid=os.getpid(), warm=report.describe())

    def _warm(self) -> None:
        os.write(self.fd, WARM)  # a few bytes into an empty socket buffer: never blocks
        self.reactor.addReader(self)

    # IReadDescriptor, on the channel until the slot's line is in.

    def fileno(self) -> int:
        return self.fd

    def logPrefix(self) -> str:
        return "spare"

    def doRead(self):
        sock = socket.socket(fileno=self.fd)
        try:
            data, descriptors, flags, _ = socket.recv_fds(sock, 65536, _MAX_DESCRIPTORS, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return None
        finally:
            sock.detach()  # the channel stays open: AMP speaks on it next
        self.descriptors.extend(descriptors)
        if flags & socket.MSG_CTRUNC:
            raise RuntimeError("more descriptors than %d for one worker" % (_MAX_DESCRIPTORS,))
        if not data:
            self.reactor.removeReader(self)
            self._stop()  # the master stops, or gave up on us
            return None
        self.data += data
        if self.data.endswith(b"\n"):
            self.reactor.removeReader(self)
            self.take(placed(json.loads(self.data), self.descriptors))
        return None

    def _leave(self) -> None:
        self.leaving = True

    def connectionLost(self, reason) -> None:
        # A reactor that stops disconnects what it still reads: the spare stopping
        # (its master stopped it) is not a lost channel.
        if not self.leaving:
            log.failure("spare worker {pid}: channel lost", reason, pid=os.getpid())
        self._stop()

    def _stop(self) -> None:
        for fd in self.descriptors:
            os.close(fd)
        self.descriptors = []
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass  # already shutting down
