"""
The twistd plugin's options and service: C{twistd -n cacheproxy -c conf.yml}.

Flags are nutcracker 0.5.0's (C{-h -V -t -d -D -v -o -c -s -a -i -p -m}): any
nutcracker command line, with the program's name swapped, means the same here.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet.defer import succeed
from twisted.logger import Logger
from twisted.python import usage
from zope.interface import implementer

from twistedproxy import logs
from twistedproxy._version import __version__
from twistedproxy.config import ConfigError, load_config, load_config_text
from twistedproxy.control.interface import IProxyControl
from twistedproxy.process import command
from twistedproxy.process.command import twistd_options

log = Logger()

# nutcracker's -m limits (src/nc_mbuf.h), and its default.
MBUF_MIN, MBUF_MAX, MBUF_DEFAULT = 512, 16777216, 16384


def _int(value):
    return int(value)


class Options(usage.Options):
    """Command line of C{twistd cacheproxy} and C{cacheproxy}."""

    synopsis = "[options]"
    longdesc = "A twemproxy-compatible caching proxy for memcached and Redis."

    optFlags = [
        ["test-conf", "t", "Test the configuration for syntax errors and exit."],
        ["daemonize", "d", "Run as a daemon (under twistd: twistd's own daemon mode, so not with -n)."],
    ]
    optParameters = [
        ["conf-file", "c", "conf/nutcracker.yml", "Configuration file (nutcracker.yml format)."],
        ["verbose", "v", 5, "Log level, 0 (emergencies only) .. 11 (everything); nutcracker's numbers.", _int],
        ["output", "o", None, "Log file (default: standard error)."],
        ["stats-port", "s", 22222, "Stats monitoring port.", _int],
        ["stats-addr", "a", "0.0.0.0", "Stats monitoring address."],
        ["stats-interval", "i", 30000, "Stats aggregation interval in milliseconds.", _int],
        ["pid-file", "p", None, "Write the process id to this file (removed on exit; see the README on upgrades)."],
        ["mbuf-size", "m", MBUF_DEFAULT,
         "nutcracker's mbuf chunk size, %d..%d bytes: accepted and checked, advisory here." % (MBUF_MIN, MBUF_MAX),
         _int],
    ]

    def opt_version(self):
        """Print the version and exit."""
        print("This is twistedproxy-%s (a twemproxy-compatible proxy)" % (__version__,))
        sys.exit(0)

    opt_V = opt_version

    def opt_describe_stats(self):
        """Print the stats descriptions (as nutcracker -D does) and exit."""
        from twistedproxy.stats.describe import describe_stats

        print("This is twistedproxy-%s (a twemproxy-compatible proxy)" % (__version__,))
        sys.stdout.write(describe_stats())
        sys.exit(0)

    opt_D = opt_describe_stats
    opt_h = usage.Options.opt_help

    def postOptions(self):
        if self["verbose"] < 0 or self["verbose"] > 11:
            raise usage.UsageError("-v takes a level from 0 to 11")
        if not MBUF_MIN <= self["mbuf-size"] <= MBUF_MAX:
            raise usage.UsageError("mbuf chunk size must be between %d and %d bytes" % (MBUF_MIN, MBUF_MAX))



def check_config(path: str, out=sys.stdout) -> bool:
    """nutcracker -t: say whether the file is valid; True when it is."""
    try:
        config = load_config(path)
    except ConfigError as e:
        out.write("cacheproxy: configuration file '%s' syntax is invalid\n%s\n" % (path, e))
        return False
    except OSError as e:
        out.write("cacheproxy: configuration file '%s' cannot be read: %s\n" % (path, e))
        return False
    for warning in config.warnings:
        out.write("cacheproxy: warning: %s\n" % (warning,))
    out.write("cacheproxy: configuration file '%s' syntax is ok\n" % (path,))
    return True


@implementer(IProxyControl)
class ProxyService(service.Service):
    """
    Runs every pool of a configuration in this process (and its stats endpoints,
    and the control endpoint when C{global: control} names a socket).

    With C{config_path} and C{handle_signals} (what twistd and C{cacheproxy} do),
    signals act as on a master where one process can: SIGHUP reopens the log
    file, as nutcracker does for logrotate, and applies the file again if it
    changed; SIGUSR1 reopens the log file; SIGTTIN/SIGTTOU make the log more or
    less verbose; SIGQUIT stops.
    """

    def __init__(self, config, reactor=None, stats_port=None, stats_addr="0.0.0.0",
                 config_path=None, config_text=None, handle_signals=False, pid_file=None):
        self.config = config
        self._reactor = reactor
        self.proxy = None
        self.stats_port = stats_port  # nutcracker's -s; None or 0: no stats port
        self.stats_addr = stats_addr
        self.stats_ports = {}  # socket name -> port (stats_server.start)
        self.config_path = config_path
        self.config_text = config_text
        self.handle_signals = handle_signals
        self.pid_file = pid_file  # nutcracker's -p: written at start, removed at stop
        self.serving = None  # fires once listening (after the warm-up); fails if it cannot
        self.failed = False  # could not listen after the warm-up
        self.sources = None  # the stats endpoints' (and the control endpoint's) view of the proxy
        self.control_port = None
        self.started_at = 0.0
        self.last_reload = {"ok": None, "error": "", "time": None}

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    def startService(self):
        service.Service.startService(self)
        from twistedproxy.api import Proxy
        from twistedproxy.process.limits import RefusalLog
        from twistedproxy.stats import server as stats_server

        if self.pid_file:
            command.write_pid_file(self.pid_file)
        if self.handle_signals:
            self._install_signals()  # before listening: a client may signal as soon as it can connect
        self.proxy = Proxy(self.config, self.reactor, state_store=self._state_store(self.config))
        self.sources = stats_server.LocalSources(self.proxy)
        self.started_at = self.reactor.seconds()
        RefusalLog(self.reactor).start()
        # Listening only once warm: the first clients must not wait for the JIT.
        self.serving = self.proxy.warm_up()
        self.serving.addCallback(self._serve)
        self.serving.addErrback(self._cannot_serve)

    def _state_store(self, config):
        """Where online migrations are kept: the state directory of the file (in memory without one)."""
        if self.config_path is None:
            return None
        from twistedproxy.migration.state import file_store

        return file_store(config, self.config_path)

    def _serve(self, report) -> None:
        """Listen (after the warm-up C{report}, None when off); raises if a port cannot be opened."""
        if not self.running:
            return  # stopped while warming up
        log.info("{warm}; listening on {addresses}",
                 warm=report.describe() if report is not None else "no warm-up",
                 addresses=", ".join(str(pool.listen) for pool in self.config.listening))
        self.proxy.start()
        self._serve_stats()
        self._open_control()
        command.daemon_started()

    def _cannot_serve(self, failure) -> None:
        # As a start that raises: logged, and the process ends (exit status 1 from cacheproxy).
        log.failure("cacheproxy cannot start", failure)
        self.failed = True
        self.reactor.stop()

    def _serve_stats(self) -> None:
        from twistedproxy.stats import server as stats_server

        self.stats_ports = stats_server.start(
            self.reactor, self.sources, stats_server.endpoints(self.config.global_, self.stats_port, self.stats_addr),
            self.stats_ports,
        )

    def _open_control(self) -> None:
        path = self.config.global_.control
        if path:
            from twistedproxy.control.server import listen_control

            self.control_port = listen_control(self.reactor, path, self, self.config.global_.control_mode)

    def _close_control(self) -> None:
        if self.control_port is not None:
            from twistedproxy.control.server import stop_control

            port, self.control_port = self.control_port, None
            stop_control(port, self.config.global_.control)

    def _install_signals(self) -> None:
        import signal

        from twistedproxy import signals

        def step(by):
            logs.set_level(logs.stepped_level(by))
            log.info("log level is now {name}", name=logs.current_level().name)

        def reopen():
            logs.reopen()
            log.info("log files reopened")

        def hangup():
            reopen()
            self.reload()

        signals.install(self.reactor, {
            signal.SIGHUP: ("reopening log file", hangup),
            signal.SIGUSR1: ("", reopen),
            signal.SIGTTIN: ("up logging level", lambda: step(1)),
            signal.SIGTTOU: ("down logging level", lambda: step(-1)),
            signal.SIGQUIT: ("exiting", self.reactor.stop),
            signal.SIGINT: ("exiting", None),  # the reactor stops
            signal.SIGTERM: ("exiting", None),
            signal.SIGUSR2: ("", lambda: log.warn("no upgrade: {error}", error=self.start_upgrade()[1])),
        })

    def reload(self):
        """
        Apply the configuration file again (between requests, keeping client
        connections, and the backend connections of pools it leaves as they
        were); an invalid file changes nothing.  Settings changed at run time
        go back to the file's values, as under a master.  A Deferred fires
        with (whether the running configuration is now the file's, the error).
        """
        try:
            text, config = load_config_text(self.config_path)
        except (ConfigError, OSError) as e:
            log.error("reload refused; the running configuration stays:\n{error}", error=str(e))
            self._record_reload(False, str(e))
            return succeed((False, str(e)))
        if config.global_.worker_processes != self.config.global_.worker_processes:
            log.warn("worker_processes changes take a restart; the pools are applied now")
        from twistedproxy.stats import server as stats_server

        old_global = self.config.global_
        try:
            # Pools whose change waits for their migration: refused, the others apply.
            waiting = self.proxy.reconfigure(config)
        except ConfigError as e:
            log.error("reload refused; the running configuration stays:\n{error}", error=str(e))
            self._record_reload(False, str(e))
            return succeed((False, str(e)))
        self.config, self.config_text = config, text
        if stats_server.moved(old_global, config.global_):
            self._serve_stats()
        if waiting:
            error = "; ".join(waiting)
            log.error("reloaded {path} but not every pool: {error}", path=self.config_path, error=error)
            self._record_reload(False, error)
            return succeed((False, error))
        log.info("reloaded {path}", path=self.config_path)
        self._record_reload(True, "")
        return succeed((True, ""))

    def _record_reload(self, ok, error) -> None:
        self.last_reload = {"ok": ok, "error": error, "time": self.reactor.seconds() - self.started_at}

    # -- IProxyControl: what the control endpoint asks of a single process --------------

    def status(self) -> dict:
        import hashlib

        return {
            "pid": os.getpid(),
            "uptime": round(self.reactor.seconds() - self.started_at, 3),
            "config": self.config_path,
            "config_digest": hashlib.sha256((self.config_text or "").encode("utf-8")).hexdigest(),
            "worker_processes": 0,
            "workers": [],
            "last_reload": self.last_reload,
            "log_level": logs.current_level().name,
            "upgrading": False,
            "stopping": not self.running,
        }

    def collect_stats(self):
        from twistedproxy.stats import snapshots

        return succeed({str(os.getpid()): snapshots.snapshot(self.proxy)})

    def start_upgrade(self):
        return False, "an upgrade (SIGUSR2) needs a master: set global: worker_processes"

    def migration(self, action, pool=None):
        if self.proxy is None:
            return False, "the proxy is not started yet"
        return self.proxy.migration(action, pool)

    def stop(self, graceful=True) -> None:
        """Stop the process (as SIGQUIT does): in-flight requests get their replies or errors as the pools close."""
        self.reactor.stop()

    def set_workers(self, count):
        return False, "worker_processes changes take a restart (this proxy runs as a single process)"

    def set_log_level(self, level) -> None:
        logs.set_level(level)

    def slowlog(self, limit=None):
        return self.sources.slowlog(limit)

    def tune(self, changes, pool=None):
        return self.sources.tune(changes, pool)

    def stopService(self):
        service.Service.stopService(self)
        for port in self.stats_ports.values():
            port.stopListening()
        self.stats_ports = {}
        self._close_control()
        if self.pid_file:
            command.remove_pid_file(self.pid_file)
        if self.proxy is not None:
            return self.proxy.stop()


class _TwistdLevelLog(service.MultiService):
    """
    Runs one service under twistd with twistd's own log (standard output,
    C{--logfile} or C{twistd.log}, rotated on SIGUSR1 as twistd does) obeying
    C{-v} and SIGTTIN/SIGTTOU: twistd logs through an C{ILogObserver}
    component of its application when there is one, so this sets there the
    observer twistd would make, behind the level filter.  (With C{--syslog}
    or C{--logger}, twistd's own choice stands.)
    """

    def __init__(self, inner, twistd_options):
        service.MultiService.__init__(self)
        self.twistd_options = twistd_options
        # Made now: what twistd would make of its options as the operator gave them.
        self.observer = _twistd_observer(twistd_options)
        inner.setServiceParent(self)

    def setServiceParent(self, parent):
        observer = self.observer
        if observer is not None and hasattr(parent, "setComponent"):  # twistd's Application
            from twisted.logger import ILogObserver

            parent.setComponent(ILogObserver, observer)
        service.MultiService.setServiceParent(self, parent)


def _twistd_observer(twistd_options):
    """The log observer twistd would make for C{twistd_options}, behind our level filter; or None."""
    if twistd_options.get("syslog") or twistd_options.get("logger"):
        return None
    try:
        from twisted.scripts._twistd_unix import UnixAppLogger

        observer = UnixAppLogger(twistd_options)._getLogObserver()
    except (ImportError, AttributeError):
        return None  # another Twisted: leave twistd's log as it is
    from twisted.logger import FilteringLogObserver

    from twistedproxy import logs

    return FilteringLogObserver(observer, [logs.level_filter])


def makeService(options, reactor=None):
    """The service twistd runs for C{cacheproxy}."""
    twistd = twistd_options(options)
    if twistd is not None and options["daemonize"] and twistd["nodaemon"]:
        raise usage.UsageError("-d/--daemonize: twistd daemonizes by itself; drop twistd's -n/--nodaemon")
    if twistd is not None and reactor is None:
        # twistd asks for the service before it installs its default reactor
        # (unless -r named one, which then stays): ours goes in first.
        from twistedproxy.reactor import install as install_reactor

        try:
            reactor = install_reactor()
        except ValueError as e:
            raise usage.UsageError(str(e))
    made = _make_service(options, reactor)
    if twistd is None:
        return made
    wrapped = _TwistdLevelLog(made, twistd)
    from twistedproxy.process.upgrade import READY_ENV

    if READY_ENV in os.environ:
        # The new master of an upgrade runs the operator's twistd command line
        # again; it must not daemonize a second time (nginx neither): the old
        # master waits for it as its child.  Its log stays where that line puts it.
        twistd["nodaemon"] = True
    return wrapped


def _make_service(options, reactor=None):
    from twistedproxy import logs

    path = options["conf-file"]
    if options["test-conf"]:
        sys.exit(0 if check_config(path) else 1)
    try:
        text, config = load_config_text(path)
    except (ConfigError, OSError) as e:
        raise usage.UsageError("configuration file '%s' is invalid:\n%s" % (path, e))
    logs.set_level(logs.level_for_verbosity(options["verbose"]))
    if options["output"]:
        logs.add_observer(options["output"])
    for warning in config.warnings:
        log.warn("{warning}", warning=warning)
    from twistedproxy.process.limits import raise_open_files

    raise_open_files(config)  # before any worker starts: they inherit it
    if config.global_.worker_processes > 0:
        from twistedproxy.process.master import MasterService

        try:
            return MasterService(config, options, reactor, config_text=text)
        except (ConfigError, OSError) as e:
            raise usage.UsageError("configuration file '%s' is invalid:\n%s" % (path, e))
    pid_file = options["pid-file"] and os.path.abspath(options["pid-file"])
    from twistedproxy.migration.coordinator import check_restart
    from twistedproxy.migration.state import file_store

    try:
        # Before anything starts: migrations kept in the state directory must fit the file.
        check_restart(file_store(config, path), config)
    except (ConfigError, ValueError) as e:
        raise usage.UsageError("cannot start: %s" % (e,))
    return ProxyService(config, reactor, stats_port=options["stats-port"], stats_addr=options["stats-addr"],
                        config_path=os.path.abspath(path), config_text=text, handle_signals=True,
                        pid_file=pid_file)
