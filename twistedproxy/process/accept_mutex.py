"""
nginx's accept mutex, for workers sharing the master's listening sockets on
kernels (or socket types) without SO_REUSEPORT balancing.

One anonymous file, created by the master and passed to every worker as a
descriptor, holds both halves:

  - byte 0 carries a POSIX record lock (fcntl): the mutex.  Only the holder
    keeps its listening ports in the reactor; the others stop reading them, so
    a new connection wakes one worker instead of all.
  - the file's words are a table of per-worker connection counts (slot ->
    connections + 1; 0 = no worker), shared through mmap, which keeps the load
    even: a worker holding more than 7/8 of its share (the workers' mean) plus
    one connection stops competing for the lock while some worker is at or
    below that line (nginx's C{ngx_accept_disabled}, which compares against
    7/8 of a fixed capacity instead of the workers' mean).

Workers try the lock every L{INTERVAL} seconds; the holder gives it up at the
next try after accepting anything, so every worker gets turns.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import tempfile

SLOTS = 256  # the largest worker slot number + 1 (the most workers)
INTERVAL = 0.02  # seconds between lock attempts (nginx's accept_mutex_delay is 0.5)
_WORD = struct.Struct("=q")
SIZE = SLOTS * _WORD.size


def create_file() -> int:
    """The master's shared file: an unlinked temporary file of L{SIZE} bytes; returns its descriptor."""
    fd, path = tempfile.mkstemp(prefix="twistedproxy-accept-")
    os.unlink(path)
    os.ftruncate(fd, SIZE)
    return fd


def clear_slot(fd: int, slot: int) -> None:
    """Mark C{slot} as having no worker (the master, when a worker exits)."""
    os.pwrite(fd, _WORD.pack(0), slot * _WORD.size)


class AcceptMutex:
    """
    One worker's side of the mutex.

    @param ports: a callable returning the worker's listening ports now.
    @param connections: a callable returning the worker's client count now.
    """

    def __init__(self, reactor, fd: int, slot: int, ports, connections, interval: float = INTERVAL):
        self.reactor = reactor
        self.fd = fd
        self.slot = slot
        self.ports = ports
        self.connections = connections
        self.interval = interval
        self.table = mmap.mmap(fd, SIZE)
        self.held = False
        self.accepted_since_tick = False
        self.own = 0
        self._call = None

    def start(self) -> None:
        self._publish(self.connections())
        self._pause_ports()
        self._tick()

    def stop(self) -> None:
        """Stop competing (and release the lock); the ports are left as they are."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._release()
        self._publish(-1)

    def accepted(self) -> None:
        """A connection was just accepted: count it and leave the lock if now over the threshold."""
        self._publish(self.own + 1)
        self.accepted_since_tick = True
        if self.held and self._over():
            self._release()
            self._pause_ports()

    # -- internals ------------------------------------------------------------

    def _publish(self, count: int) -> None:
        self.own = count
        _WORD.pack_into(self.table, self.slot * _WORD.size, count + 1)

    def _over(self) -> bool:
        """Whether this worker should leave the accepting to others that have fewer connections."""
        counts = [value - 1 for (value,) in _WORD.iter_unpack(self.table) if value]
        if len(counts) < 2:
            return False
        limit = sum(counts) * 7 / (8 * len(counts)) + 1
        return self.own > limit and any(count <= limit for count in counts)

    def _tick(self) -> None:
        self._call = self.reactor.callLater(self.interval, self._tick)
        self._publish(self.connections())
        if self.held and (self.accepted_since_tick or self._over()):
            self._release()
            self._pause_ports()
            self.accepted_since_tick = False
            return  # let another worker take it before trying again
        self.accepted_since_tick = False
        if not self.held and not self._over() and self._acquire():
            for port in self.ports():
                port.startReading()

    def _acquire(self) -> bool:
        try:
            fcntl.lockf(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
        except OSError:
            return False
        self.held = True
        return True

    def _release(self) -> None:
        if self.held:
            fcntl.lockf(self.fd, fcntl.LOCK_UN, 1, 0)
            self.held = False

    def _pause_ports(self) -> None:
        for port in self.ports():
            port.stopReading()
