"""
Listening sockets for pools: TCP (optionally SO_REUSEPORT) and UNIX.

Kept apart from the core so the process model can create sockets in a master
and hand them to workers (adoptStreamPort) with the same rules.
"""

from __future__ import annotations

import os
import socket


def bind_socket(listen, backlog: int, reuseport: bool = False) -> socket.socket:
    """
    A bound, listening, non-blocking socket for a L{ListenSpec}.  UNIX sockets
    replace a stale file and get the configured permissions.
    """
    if listen.path is not None:
        try:
            os.unlink(listen.path)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(listen.path)
        if listen.perm is not None:
            os.chmod(listen.path, listen.perm)
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


def adopt_socket(reactor, sock: socket.socket, factory):
    """Serve C{factory} on an already listening socket; returns the port object."""
    family = sock.family
    port = reactor.adoptStreamPort(sock.fileno(), family, factory)
    return port


def listen(reactor, listen_spec, factory, backlog: int = 512, reuseport: bool = False):
    """Listen for C{factory} on C{listen_spec}; returns the listening port object."""
    if listen_spec.path is not None and not reuseport:
        kwargs = {"backlog": backlog}
        if listen_spec.perm is not None:
            kwargs["mode"] = listen_spec.perm
        return reactor.listenUNIX(listen_spec.path, factory, **kwargs)
    if not reuseport:
        return reactor.listenTCP(listen_spec.port, factory, backlog=backlog, interface=listen_spec.host)
    sock = bind_socket(listen_spec, backlog, reuseport=True)
    try:
        return adopt_socket(reactor, sock, factory)
    finally:
        # adoptStreamPort dups the descriptor; ours is no longer needed.
        sock.close()
