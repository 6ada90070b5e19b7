"""
The twistd plugin's options and service: C{twistd -n cacheproxy -c conf.yml}.

Flags mirror nutcracker's where they make sense (C{-c -t -v -o -s -a -i -V}).
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.python import usage

from twistedproxy._version import __version__
from twistedproxy.config import ConfigError, load_config


def _int(value):
    return int(value)


class Options(usage.Options):
    """Command line of C{twistd cacheproxy} and C{cacheproxy}."""

    synopsis = "[options]"
    longdesc = "A twemproxy-compatible caching proxy for memcached and Redis."

    optFlags = [
        ["test-conf", "t", "Test the configuration for syntax errors and exit."],
    ]
    optParameters = [
        ["conf-file", "c", "conf/nutcracker.yml", "Configuration file (nutcracker.yml format)."],
        ["verbose", "v", 5, "Log level, 0 (emergencies only) .. 11 (everything); nutcracker's numbers.", _int],
        ["output", "o", None, "Log file (default: standard error)."],
        ["stats-port", "s", 22222, "Stats monitoring port.", _int],
        ["stats-addr", "a", "0.0.0.0", "Stats monitoring address."],
        ["stats-interval", "i", 30000, "Stats aggregation interval in milliseconds.", _int],
        ["pid-file", "p", None, "Write the process id to this file (the cacheproxy command)."],
    ]

    def opt_version(self):
        """Print the version and exit."""
        print("This is twistedproxy-%s (a twemproxy-compatible proxy)" % (__version__,))
        sys.exit(0)

    opt_V = opt_version

    def postOptions(self):
        if self["verbose"] < 0 or self["verbose"] > 11:
            raise usage.UsageError("-v takes a level from 0 to 11")


def check_config(path: str, out=sys.stdout) -> bool:
    """nutcracker -t: say whether the file is valid; True when it is."""
    try:
        load_config(path)
    except ConfigError as e:
        out.write("cacheproxy: configuration file '%s' syntax is invalid\n%s\n" % (path, e))
        return False
    except OSError as e:
        out.write("cacheproxy: configuration file '%s' cannot be read: %s\n" % (path, e))
        return False
    out.write("cacheproxy: configuration file '%s' syntax is ok\n" % (path,))
    return True


class ProxyService(service.Service):
    """Runs every pool of a configuration in this process (and its stats endpoints)."""

    def __init__(self, config, reactor=None, stats_port=None, stats_addr="0.0.0.0"):
        self.config = config
        self._reactor = reactor
        self.proxy = None
        self.stats_port = stats_port  # nutcracker's -s; None or 0: no stats port
        self.stats_addr = stats_addr
        self.stats_ports = []

    def startService(self):
        service.Service.startService(self)
        from twistedproxy.api import Proxy

        reactor = self._reactor
        if reactor is None:
            from twisted.internet import reactor
        self.proxy = Proxy(self.config, reactor)
        self.proxy.start()
        from twistedproxy.stats import server as stats_server

        self.stats_ports = stats_server.start(
            reactor, stats_server.LocalSources(self.proxy), self.stats_port, self.stats_addr,
            self.config.global_.stats_http,
        )

    def stopService(self):
        service.Service.stopService(self)
        for port in self.stats_ports:
            port.stopListening()
        self.stats_ports = []
        if self.proxy is not None:
            return self.proxy.stop()


def makeService(options, reactor=None):
    """The service twistd runs for C{cacheproxy}."""
    from twistedproxy import logs

    path = options["conf-file"]
    if options["test-conf"]:
        sys.exit(0 if check_config(path) else 1)
    try:
        config = load_config(path)
    except (ConfigError, OSError) as e:
        raise usage.UsageError("configuration file '%s' is invalid:\n%s" % (path, e))
    logs.set_level(logs.level_for_verbosity(options["verbose"]))
    if options["output"]:
        logs.add_observer(options["output"])
    if config.global_.worker_processes > 0:
        from twistedproxy.process.master import MasterService

        try:
            return MasterService(config, options, reactor)
        except (ConfigError, OSError) as e:
            raise usage.UsageError("configuration file '%s' is invalid:\n%s" % (path, e))
    return ProxyService(config, reactor, stats_port=options["stats-port"], stats_addr=options["stats-addr"])
