"""The control endpoint: AMP on a UNIX socket, answering L{commands} for an L{IProxyControl}."""

from __future__ import annotations

import os

import json

from twisted.protocols import amp

from twistedproxy import logs
from twistedproxy.config import ListenSpec
from twistedproxy.control import commands
from twistedproxy.control.interface import IProxyControl
from twistedproxy.net.channels import quiet_factory
from twistedproxy.net.sockets import adopt_port, bind_socket
from twistedproxy.stats import commands as stats_commands


class ControlProtocol(amp.AMP):
    """One control client's connection; C{proxy} provides L{IProxyControl}."""

    def __init__(self, proxy):
        amp.AMP.__init__(self)
        self.proxy = proxy

    @commands.Status.responder
    def status(self):
        return {"status": json.dumps(self.proxy.status())}

    @commands.Stats.responder
    def stats(self):
        return self.proxy.collect_stats().addCallback(lambda stats: {"stats": json.dumps(stats)})

    @commands.Reload.responder
    def reload(self):
        return self.proxy.reload().addCallback(lambda result: {"ok": result[0], "error": result[1]})

    @commands.Upgrade.responder
    def upgrade(self):
        ok, error = self.proxy.start_upgrade()
        return {"ok": ok, "error": error}

    @commands.Stop.responder
    def stop(self, graceful):
        # Answer first: the stop closes this connection.
        self.proxy.reactor.callLater(0, self.proxy.stop, graceful)
        return {}

    @commands.SetWorkers.responder
    def set_workers(self, count):
        ok, error = self.proxy.set_workers(count)
        return {"ok": ok, "error": error}

    @stats_commands.SlowLog.responder
    def slowlog(self, limit=None):
        return self.proxy.slowlog(limit).addCallback(lambda entries: {"entries": json.dumps(entries)})

    @stats_commands.Tune.responder
    def tune(self, changes, pool=None):
        d = self.proxy.tune(json.loads(changes), pool)
        return d.addCallback(lambda report: {"settings": json.dumps(report)})

    @commands.Migration.responder
    def migration(self, action, pool=None):
        ok, answer = self.proxy.migration(action, pool)
        if not ok:
            return {"ok": False, "error": answer, "records": "{}"}
        return {"ok": True, "error": "", "records": json.dumps(answer)}

    @commands.SetLogLevel.responder
    def set_log_level(self, level):
        parsed = logs.parse_level(level)
        self.proxy.set_log_level(parsed)
        return {"level": parsed.name}


def stop_control(port, path=None) -> None:
    """Stop serving the control C{port}; with C{path}, remove its socket file too (a normal exit)."""
    port.stopListening()
    if path:
        try:
            os.unlink(path)
        except OSError:
            pass


def listen_control(reactor, path: str, proxy, mode: int = 0o600):
    """
    Serve the control commands for C{proxy} (an L{IProxyControl}) on the UNIX
    socket C{path}, created with permissions C{mode} (C{global: control_mode};
    owner only by default); returns the port.  Stopping the port leaves
    the path in place (after an upgrade it belongs to the new master); its
    owner removes it on a normal exit.
    """
    proxy = IProxyControl(proxy)
    sock = bind_socket(ListenSpec(path=path, perm=mode), 16)
    try:
        return adopt_port(reactor, sock.fileno(), quiet_factory(lambda: ControlProtocol(proxy)))
    finally:
        sock.close()
