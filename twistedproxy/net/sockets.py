"""
Listening sockets: bound here (TCP, optionally SO_REUSEPORT, or UNIX) and
served by the reactor, or adopted from a descriptor bound elsewhere.

Every room that listens uses these: the single process and workers (pools),
the master (sockets it hands to workers), the control endpoint and the stats
endpoints.  They know nothing of what is served on them.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from twisted.internet import tcp, unix


def bind_socket(listen, backlog: int, reuseport: bool = False) -> socket.socket:
    """
    A bound, listening, non-blocking socket for a L{ListenSpec}.  UNIX sockets
    replace a stale file and are created with the configured permissions
    (0666 when none are, as L{listen} gives them).
    """
    if listen.path is not None:
        try:
            os.unlink(listen.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with _created_with(_permissions(listen)):
            sock.bind(listen.path)
    else:
        family = socket.AF_INET6 if ":" in (listen.host or "") else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((listen.host, listen.port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def _permissions(listen) -> int:
    """A UNIX socket's permissions: the configured ones, else 0666 as Twisted's listenUNIX gives (L{listen})."""
    return 0o666 if listen.perm is None else listen.perm


@contextlib.contextmanager
def _created_with(permissions: int):
    """
    Within it, a UNIX socket's bind() creates its file with exactly
    C{permissions}, so it never has more, not even for a moment as with a
    chmod() after it (the control socket is owner-only).
    """
    # bind() creates the file with 0777 less the umask.  The umask is the
    # process's: it is changed for one bind() in the reactor's thread, the only
    # one creating files.
    previous = os.umask(0o777 & ~permissions)
    try:
        yield
    finally:
        os.umask(previous)


@contextlib.contextmanager
def keep_nonblocking():
    """
    Within it, wrapping a descriptor in a socket object (socket(fileno=...),
    fromfd, Twisted's adoptions) leaves the descriptor non-blocking.
    """
    # PyPy makes a wrapped descriptor blocking unless the default timeout is 0.
    # The flag is the socket's, shared with every process holding it: even a
    # moment of blocking mode can leave another process (an old worker during an
    # upgrade) stuck in accept() with the connection it just took unserved.
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(0.0)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def adopt_socket(reactor, sock: socket.socket, factory):
    """Serve C{factory} on an already listening socket; returns the port object."""
    with keep_nonblocking():
        return reactor.adoptStreamPort(sock.fileno(), sock.family, factory)


def listen(reactor, listen_spec, factory, backlog: int = 512, reuseport: bool = False):
    """Listen for C{factory} on C{listen_spec}; returns the listening port object."""
    if listen_spec.path is not None and not reuseport:
        mode = _permissions(listen_spec)
        with _created_with(mode):  # listenUNIX binds at once, then chmods to the mode it has already
            return reactor.listenUNIX(listen_spec.path, factory, backlog=backlog, mode=mode)
    if not reuseport:
        return reactor.listenTCP(listen_spec.port, factory, backlog=backlog, interface=listen_spec.host)
    sock = bind_socket(listen_spec, backlog, reuseport=True)
    try:
        return adopt_socket(reactor, sock, factory)
    finally:
        # adoptStreamPort dups the descriptor; ours is no longer needed.
        sock.close()


def adopt_port(reactor, fd: int, factory, one_accept: bool = False):
    """
    Serve C{factory} on the listening socket C{fd} (not closed: the port dups it)
    and return the started port.  With C{one_accept}, each readiness accepts a
    single connection (nginx's default, needed to spread accepts fairly under
    the accept mutex).  An adopted UNIX socket's path is left in place when the
    port stops: the master owns it.
    """
    with keep_nonblocking():
        probe = socket.socket(fileno=fd)
        family = probe.family
        path = probe.getsockname() if family == socket.AF_UNIX else None
        probe.detach()  # the descriptor stays open; it was only inspected
        if family == socket.AF_UNIX:
            cls = _OneAcceptUNIXPort if one_accept else _AdoptedUNIXPort
            port = cls._fromListeningDescriptor(reactor, fd, factory)
            _keep_permissions(port, path)
        else:
            cls = _OneAcceptTCPPort if one_accept else tcp.Port
            port = cls._fromListeningDescriptor(reactor, fd, family, factory)
    port.startListening()
    return port


def _keep_permissions(port, path) -> None:
    """
    Twisted's UNIX port chmods its path when it starts listening, even on an
    adopted descriptor, to its C{mode} (0666 unless told): that opened the
    owner-only control socket to everyone.  The mode becomes the one the path
    has, so the permissions it was bound with (L{bind_socket}) stay.
    """
    try:
        port.mode = stat.S_IMODE(os.stat(path).st_mode)
    except (OSError, TypeError, ValueError):
        pass  # no file at the path (abstract, or removed): Twisted's chmod says so as before


class _AdoptedUNIXPort(unix.Port):
    def connectionLost(self, reason):
        # Skip unix.Port's unlink: the socket file belongs to the master.
        tcp.Port.connectionLost(self, reason)


class _OneAcceptUNIXPort(_AdoptedUNIXPort):
    def doRead(self):
        self.numberAccepts = 1
        _AdoptedUNIXPort.doRead(self)


class _OneAcceptTCPPort(tcp.Port):
    def doRead(self):
        self.numberAccepts = 1
        tcp.Port.doRead(self)
