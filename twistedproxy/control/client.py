"""
Clients of the master's control socket.

L{ControlClient} is for Twisted programs (every method returns a Deferred);
L{BlockingControlClient} is for scripts and tests (plain blocking calls).  Both
offer: C{status()}, C{stats()}, C{reload()}, C{upgrade()}, C{stop(graceful)},
C{set_workers(count)}, C{set_log_level(level)} and C{migration(action, pool)}.
"""

from __future__ import annotations

import json
import socket
import struct

from twisted.protocols import amp

from twistedproxy.control import commands


class ControlError(Exception):
    """The master refused a control command (an invalid reload, a bad argument...)."""


def _checked(answer: dict):
    if not answer.get("ok", True):
        raise ControlError(answer.get("error") or "refused")
    return answer


class ControlClient:
    """An AMP connection to a master's control socket, inside a Twisted program."""

    def __init__(self, protocol: amp.AMP):
        self.protocol = protocol

    @classmethod
    def connect(cls, reactor, path: str):
        """A Deferred firing with a L{ControlClient} connected to the socket at C{path}."""
        from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol

        d = connectProtocol(UNIXClientEndpoint(reactor, path), amp.AMP())
        return d.addCallback(cls)

    def close(self) -> None:
        self.protocol.transport.loseConnection()

    def _call(self, command, **kwargs):
        return self.protocol.callRemote(command, **kwargs)

    def status(self):
        return self._call(commands.Status).addCallback(lambda a: json.loads(a["status"]))

    def stats(self):
        return self._call(commands.Stats).addCallback(lambda a: json.loads(a["stats"]))

    def reload(self):
        return self._call(commands.Reload).addCallback(_checked)

    def upgrade(self):
        return self._call(commands.Upgrade).addCallback(_checked)

    def stop(self, graceful: bool = True):
        return self._call(commands.Stop, graceful=graceful)

    def set_workers(self, count: int):
        return self._call(commands.SetWorkers, count=count).addCallback(_checked)

    def set_log_level(self, level: str):
        return self._call(commands.SetLogLevel, level=str(level)).addCallback(lambda a: a["level"])

    def migration(self, action: str = "status", pool=None):
        """A Deferred firing with {pool: record} (fails with L{ControlError} when refused)."""
        kwargs = {"pool": pool} if pool else {}
        d = self._call(commands.Migration, action=action, **kwargs).addCallback(_checked)
        return d.addCallback(lambda a: json.loads(a["records"]))


class BlockingControlClient:
    """The same commands over a plain blocking socket (no reactor needed)."""

    def __init__(self, path: str, timeout: float = 10.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buffer = b""
        self.tag = 0

    def close(self) -> None:
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def call(self, command, **kwargs) -> dict:
        """Send one AMP command and wait for its answer (a dict of the response's values)."""
        self.tag += 1
        box = command.makeArguments(kwargs, None)
        box[b"_command"] = command.commandName
        box[b"_ask"] = b"%x" % self.tag
        self.sock.sendall(box.serialize())
        answer = self._read_box()
        if b"_error" in answer:
            raise ControlError(answer.get(b"_error_description", b"error").decode("utf-8", "replace"))
        return command.parseResponse(answer, None)

    def _read_box(self) -> dict:
        box = amp.AmpBox()
        while True:
            key = self._read(self._read_length())
            if not key:
                return box
            box[key] = self._read(self._read_length())

    def _read_length(self) -> int:
        return struct.unpack("!H", self._read(2))[0]

    def _read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ControlError("the master closed the control connection")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def status(self) -> dict:
        return json.loads(self.call(commands.Status)["status"])

    def stats(self) -> dict:
        return json.loads(self.call(commands.Stats)["stats"])

    def reload(self) -> dict:
        return _checked(self.call(commands.Reload))

    def upgrade(self) -> dict:
        return _checked(self.call(commands.Upgrade))

    def stop(self, graceful: bool = True) -> None:
        self.call(commands.Stop, graceful=graceful)

    def set_workers(self, count: int) -> dict:
        return _checked(self.call(commands.SetWorkers, count=count))

    def set_log_level(self, level) -> str:
        return self.call(commands.SetLogLevel, level=str(level))["level"]

    def migration(self, action: str = "status", pool=None) -> dict:
        """{pool: record} after C{action} (status, pause, resume, abort); L{ControlError} when refused."""
        kwargs = {"pool": pool} if pool else {}
        return json.loads(_checked(self.call(commands.Migration, action=action, **kwargs))["records"])
