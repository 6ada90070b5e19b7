"""The master's control endpoint: AMP on a UNIX socket, answering L{commands}."""

from __future__ import annotations

import json

from twisted.protocols import amp

from twistedproxy.config import ListenSpec
from twistedproxy.control import commands
from twistedproxy.process.channel import quiet_factory
from twistedproxy.process.listeners import adopt_port, bind_socket
from twistedproxy.stats import commands as stats_commands
from twistedproxy.stats.workers import WorkerSources


class ControlProtocol(amp.AMP):
    """One control client's connection; C{master} is a L{MasterService}."""

    def __init__(self, master):
        amp.AMP.__init__(self)
        self.master = master

    @commands.Status.responder
    def status(self):
        return {"status": json.dumps(self.master.status())}

    @commands.Stats.responder
    def stats(self):
        return self.master.collect_stats().addCallback(lambda stats: {"stats": json.dumps(stats)})

    @commands.Reload.responder
    def reload(self):
        return self.master.reload().addCallback(lambda result: {"ok": result[0], "error": result[1]})

    @commands.Upgrade.responder
    def upgrade(self):
        ok, error = self.master.start_upgrade()
        return {"ok": ok, "error": error}

    @commands.Stop.responder
    def stop(self, graceful):
        # Answer first: the stop closes this connection.
        self.master.reactor.callLater(0, self.master.stop, graceful)
        return {}

    @commands.SetWorkers.responder
    def set_workers(self, count):
        ok, error = self.master.set_workers(count)
        return {"ok": ok, "error": error}

    @stats_commands.SlowLog.responder
    def slowlog(self, limit=None):
        d = WorkerSources(self.master).slowlog(limit)
        return d.addCallback(lambda entries: {"entries": json.dumps(entries)})

    @stats_commands.Tune.responder
    def tune(self, changes, pool=None):
        d = WorkerSources(self.master).tune(json.loads(changes), pool)
        return d.addCallback(lambda report: {"settings": json.dumps(report)})

    @commands.SetLogLevel.responder
    def set_log_level(self, level):
        from twistedproxy.process.master import parse_level

        parsed = parse_level(level)
        self.master.set_log_level(parsed)
        return {"level": parsed.name}


def listen_control(reactor, path: str, master):
    """
    Serve the control commands on the UNIX socket C{path} (mode 0600); returns
    the port.  Stopping the port leaves the path in place (after an upgrade it
    belongs to the new master); the master removes it on a normal exit.
    """
    sock = bind_socket(ListenSpec(path=path, perm=0o600), 16)
    try:
        return adopt_port(reactor, sock.fileno(), quiet_factory(lambda: ControlProtocol(master)))
    finally:
        sock.close()
