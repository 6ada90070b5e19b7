"""
The master's listening sockets, handed to workers as descriptors: their names
(one per address, or one per address and worker slot with reuseport), the
sockets an upgrading master inherits, and L{ListeningSockets}, the room of the
master that opens, hands out and closes them.

The socket primitives are L{twistedproxy.net.sockets}'s; the stats endpoints'
sockets are named by L{twistedproxy.stats.server.stats_key}.
"""

from __future__ import annotations

import os
import socket

from twisted.logger import Logger

from twistedproxy.net.sockets import bind_socket, keep_nonblocking
from twistedproxy.process import accept_mutex

log = Logger()

# Names the listening descriptors a new master inherits on upgrade (nginx's
# NGINX variable): "key=fd;key=fd", keys from socket_key().
INHERIT_ENV = "TWISTEDPROXY_LISTEN_FDS"


def socket_key(listen_spec, slot) -> str:
    """
    The name of one listening socket of the master: the address, and the worker
    slot it serves in reuseport mode (C{None}: shared by every worker).
    """
    return "%s#%s" % (listen_spec, "shared" if slot is None else slot)


# Linux 5.14+: when one socket of a SO_REUSEPORT group closes, the connections
# waiting in its accept queue move to another socket of the group instead of
# being reset.  Off by default; a per-network-namespace setting.
MIGRATE_SYSCTL = "/proc/sys/net/ipv4/tcp_migrate_req"


def reuseport_migration(path: str = MIGRATE_SYSCTL):
    """
    Whether closing a SO_REUSEPORT socket hands its queued connections to the
    rest of its group (C{net.ipv4.tcp_migrate_req}): True, False, or None when
    this kernel does not say.
    """
    try:
        with open(path) as f:
            return f.read().strip() != "0"
    except (OSError, ValueError):
        return None


def is_slot_key(key: str) -> bool:
    """Whether a L{socket_key} names a worker slot's own (reuseport) socket."""
    return not key.startswith("stats#") and key.rpartition("#")[2].isdigit()


def inherited_sockets(environ) -> dict:
    """The listening sockets named by L{INHERIT_ENV} in C{environ}: key -> socket."""
    found = {}
    for item in environ.get(INHERIT_ENV, "").split(";"):
        key, sep, fd = item.rpartition("=")
        if not sep or not fd.isdigit():
            continue
        fd = int(fd)
        try:
            with keep_nonblocking():
                sock = socket.socket(fileno=fd)
        except OSError:
            continue  # not an open socket: ignore rather than adopt garbage
        os.set_inheritable(fd, False)
        found[key] = sock
    return found




class ListeningSockets:
    """
    The master's listening sockets (socket name -> socket) and the
    accept-mutex file: opened for a configuration and a worker count, handed
    to each worker slot as descriptors, closed when no worker may use them.

    @ivar handed_over: an upgraded master took the sockets: closing one leaves
        its UNIX path in place (it is the new master's now).
    """

    def __init__(self):
        self.sockets = {}
        self.mutex_fd = None
        self.use_mutex = False
        self.handed_over = False

    @staticmethod
    def wanted(config, count) -> dict:
        """socket name -> (pool config, slot or None) for C{config} with C{count} workers."""
        keys = {}
        shared = config.global_.listen_mode == "shared"
        for pool in config.listening:
            if shared or pool.listen.is_unix:
                keys[socket_key(pool.listen, None)] = (pool, None)
            else:
                for slot in range(count):
                    keys[socket_key(pool.listen, slot)] = (pool, slot)
        return keys

    def ensure(self, config, count, inherited=None) -> None:
        """
        Have every socket C{config} needs with C{count} workers: kept when open,
        taken from C{inherited} (name -> socket, consumed; an upgrade's) when
        there, bound otherwise.  On a bind error every socket bound here is
        closed and the error raised: nothing changed.
        """
        available = inherited if inherited is not None else dict(self.sockets)
        opened = {}
        made = []
        try:
            for key, (pool, slot) in self.wanted(config, count).items():
                sock = available.pop(key, None)
                if sock is None:
                    # SO_REUSEPORT on every TCP socket: lets a reuseport group grow
                    # and a rollover bind the same address in the other mode.
                    sock = bind_socket(pool.listen, pool.backlog, reuseport=not pool.listen.is_unix)
                    made.append(sock)
                opened[key] = sock
        except OSError:
            for sock in made:
                sock.close()
            raise
        self.sockets.update(opened)

    def fds_for(self, config, slot) -> dict:
        """pool name -> the master's descriptor that worker C{slot} serves."""
        shared = config.global_.listen_mode == "shared"
        fds = {}
        for pool in config.listening:
            one = shared or pool.listen.is_unix
            fds[pool.name] = self.sockets[socket_key(pool.listen, None if one else slot)].fileno()
        return fds

    def prune(self, config, count) -> None:
        """Close the sockets C{config} with C{count} workers no longer uses (no worker may be left on them)."""
        wanted = self.wanted(config, count)
        closing = [key for key in self.sockets if key not in wanted]
        slots = sum(1 for key in closing if is_slot_key(key))
        if slots and reuseport_migration() is False:
            log.warn(
                "closing {count} reuseport socket(s): connections still queued on them are reset;"
                " set net.ipv4.tcp_migrate_req=1 to have the kernel move them to the other workers",
                count=slots,
            )
        for key in closing:
            self.close(self.sockets.pop(key))

    def close(self, sock) -> None:
        """Close C{sock}, and remove its UNIX path unless an upgraded master took it."""
        path = None
        if sock.family == socket.AF_UNIX and not self.handed_over:
            path = sock.getsockname()
        sock.close()
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    # -- the accept mutex ---------------------------------------------------------

    def setup_mutex(self, config) -> None:
        """The accept mutex serialises shared sockets only: reuseport sockets have one worker each."""
        glob = config.global_
        self.use_mutex = glob.accept_mutex and glob.listen_mode == "shared"
        if self.use_mutex and self.mutex_fd is None:
            self.mutex_fd = accept_mutex.create_file()

    def slot_gone(self, slot) -> None:
        """The worker of C{slot} ended: it holds no accepts any more."""
        if self.mutex_fd is not None:
            accept_mutex.clear_slot(self.mutex_fd, slot)

    def close_all(self) -> None:
        for sock in self.sockets.values():
            self.close(sock)
        self.sockets = {}
        if self.mutex_fd is not None:
            os.close(self.mutex_fd)
            self.mutex_fd = None
