"""
The AMP pieces every channel uses (master <-> worker, the control socket, the
old master -> the new one): text of any length, and factories and logs that
stay quiet about routine connections.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.logger import LogLevel
from twisted.protocols import amp

from twistedproxy import logs

# AMP caps one value at 65535 bytes; a configuration can be longer.
_CHUNK = 60000


class BigUnicode(amp.Argument):
    """
    Text of any length, sent as numbered chunks C{name.0}, C{name.1}, ...
    An optional one left out (or None) is not sent, and not handed to the
    responder (which takes its default).
    """

    def fromBox(self, name, strings, objects, proto):
        if self.optional and b"%s.0" % (name,) not in strings:
            return
        parts = []
        index = 0
        while True:
            key = b"%s.%d" % (name, index)
            part = strings.get(key)
            if part is None:
                break
            parts.append(part)
            index += 1
        objects[str(name, "ascii")] = b"".join(parts).decode("utf-8")

    def toBox(self, name, strings, objects, proto):
        if self.optional and objects.get(str(name, "ascii")) is None:
            return
        data = objects[str(name, "ascii")].encode("utf-8")
        for index, start in enumerate(range(0, max(len(data), 1), _CHUNK)):
            strings[b"%s.%d" % (name, index)] = data[start:start + _CHUNK]


def quiet_factory(build):
    """A factory whose protocols come from C{build()}, without start/stop log lines."""
    factory = Factory()
    factory.noisy = False
    factory.buildProtocol = lambda addr: build()
    return factory


def quiet_amp_logs() -> None:
    """AMP logs every connection at info level; the channels and control clients are routine."""
    logs.level_filter.setLogLevelForNamespace("twisted.protocols.amp", LogLevel.warn)
