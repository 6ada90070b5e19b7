"""
A worker process: C{python -m twistedproxy.process.worker}, titled
C{cacheproxy: worker process SLOT}.

Started by the master (L{twistedproxy.process.master}) with its descriptors in
place; the environment variable L{LAYOUT_ENV} holds a JSON object naming them::

    {"master": pid, "slot": n, "channel": fd, "listen": {"pool": fd, ...},
     "mutex": fd or null, "level": "info", "output": path or null,
     "replacing": true when it replaces a crashed worker (a shorter warm-up)}

or, for a spare (L{twistedproxy.process.spare}), C{{"master": pid, "channel":
fd, "spare": true, "config": the master's file, "level", "output"}}: it imports
what a worker runs, warms up on the file's pools, then waits on its channel for
the layout of the slot it takes, and goes on from there as any worker.

The worker asks the master for its configuration over the AMP channel
(L{channel.Hello}), builds the pools, warms the request path up
(L{twistedproxy.core.warmup}), then serves the listening sockets it was given
(it never binds one itself) and says L{channel.Ready}.  It exits when the
channel closes (the master is gone) and, as a second guard, when its parent
dies (PR_SET_PDEATHSIG).

Signals: SIGQUIT graceful stop, SIGTERM/SIGINT fast stop, SIGUSR1 reopen logs;
the master's other signals are ignored (they are the master's business).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys

from twisted.internet.defer import Deferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.interfaces import ILoggingContext, IProtocolFactory
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger
from twisted.protocols import amp
from zope.interface import implementer

from twistedproxy import logs
from twistedproxy.config import ConfigError, parse_config
from twistedproxy.config.migration import MigrationState
from twistedproxy.core import warmup
from twistedproxy.core.logins import RemoteAuthLimiter
from twistedproxy.net.channels import quiet_amp_logs, quiet_factory
from twistedproxy.net.sockets import adopt_port
from twistedproxy.process import channel, command, ejection, handoff, logins, spare
from twistedproxy.process.accept_mutex import AcceptMutex
from twistedproxy.process.limits import RefusalLog
from twistedproxy.stats import commands as stats_commands, workers as stats_workers

log = Logger()

# The environment variable that carries the worker's layout (kept off its command line).
LAYOUT_ENV = "TWISTEDPROXY_WORKER_LAYOUT"
_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Ask the kernel for SIGTERM when the parent dies (Linux prctl); exit if it already has."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux, or no prctl: the channel still guards
    if os.getppid() != parent_pid:
        os._exit(0)  # the master died before prctl took effect


def set_affinity(cpus) -> None:
    """Pin this process to C{cpus} (sched_setaffinity, or taskset where os lacks it)."""
    if not cpus:
        return
    try:
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cpus)
        else:
            import subprocess

            subprocess.run(
                ["taskset", "-p", "-c", ",".join(str(c) for c in cpus), str(os.getpid())],
                check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
    except Exception as e:
        log.warn("worker cpu affinity {cpus} not applied: {error}", cpus=list(cpus), error=str(e))


def drop_privileges(user, group) -> None:
    """Become C{user}/C{group} (names) when running as root; otherwise nothing to drop."""
    if os.geteuid() != 0 or not (user or group):
        return
    import grp
    import pwd

    if group:
        os.setgid(grp.getgrnam(group).gr_gid)
    if user:
        entry = pwd.getpwnam(user)
        if not group:
            os.setgid(entry.pw_gid)
        os.initgroups(user, os.getgid())
        os.setuid(entry.pw_uid)


def _quickack_reader(client):
    """C{client.dataReceived} followed by re-arming TCP_QUICKACK (Linux clears it after ACKing)."""
    read = client.dataReceived
    level, option = socket.IPPROTO_TCP, socket.TCP_QUICKACK

    def dataReceived(data):
        read(data)
        try:
            client.transport.getHandle().setsockopt(level, option, 1)
        except OSError:
            pass  # closed meanwhile

    return dataReceived


@implementer(IProtocolFactory, ILoggingContext)  # declared for the reason ProxyFactory's are
class _PoolFactory(ServerFactory):
    """
    Accepts for one pool of the worker: the proxy's current factory builds the
    client (so a reload's new pool is used), then the worker's extras.
    """

    noisy = False

    def __init__(self, worker, name):
        self.worker = worker
        self.name = name

    def buildProtocol(self, addr):
        worker = self.worker
        client = worker.proxy.factories[self.name].buildProtocol(addr)
        if client is not None and worker.mutex is not None:
            worker.mutex.accepted()
        if client is not None and worker.quickack and hasattr(addr, "port"):
            client.dataReceived = _quickack_reader(client)
        return client

    def adopt(self, fd: int, family: int, state: str) -> dict:
        """A client another worker hands over (L{handoff.adopt}), prepared as an accepted one."""

        def prepare(client):
            if self.worker.quickack and family != socket.AF_UNIX:
                client.dataReceived = _quickack_reader(client)

        factory = self.worker.proxy.factories[self.name]
        return handoff.adopt(self.worker.reactor, factory, fd, family, state, prepare)


class WorkerChannel(amp.AMP):
    """The worker's end of the AMP channel to the master."""

    def __init__(self, worker):
        amp.AMP.__init__(self)
        self.worker = worker

    def connectionLost(self, reason):
        amp.AMP.connectionLost(self, reason)
        self.worker.channel_lost()

    @channel.Reconfigure.responder
    def reconfigure(self, config, source, migrations=None):
        try:
            self.worker.reconfigure(parse_config(config, source), _migration_state(migrations))
        except ConfigError as e:
            return {"ok": False, "error": str(e)}
        return {"ok": True, "error": ""}

    @channel.ApplyMigrations.responder
    def apply_migrations(self, migrations):
        self.worker.apply_migrations(_migration_state(migrations))
        return {}

    @channel.Stats.responder
    def stats(self):
        return {"stats": json.dumps(self.worker.stats())}

    @stats_commands.SlowLog.responder
    def slowlog(self, limit=None):
        return stats_workers.worker_slowlog(self.worker.proxy)

    @stats_commands.Tune.responder
    def tune(self, changes, pool=None):
        return stats_workers.worker_tune(self.worker.proxy, changes, pool)

    @handoff.HandOff.responder
    def hand_off(self, fd, family, listen, pool, state):
        try:
            return self.worker.adopt(fd, family, pool, state)
        finally:
            os.close(fd)  # adopted connections hold their own duplicate

    @channel.Ping.responder
    def ping(self):
        return {"pid": os.getpid()}

    @channel.Stop.responder
    def stop(self, graceful):
        self.worker.reactor.callLater(0, self.worker.stop, graceful)
        return {}

    @channel.SetLogLevel.responder
    def set_log_level(self, level):
        logs.set_level(logs.parse_level(level))
        return {}

    @channel.WorkerCount.responder
    def worker_count(self, count):
        self.worker.set_worker_count(count)
        return {}

    @channel.ServerHealth.responder
    def server_health(self, pool, server, state):
        found = ejection.find_server(self.worker.proxy, pool, server)
        if found is not None:
            ejection.apply_verdict(found, state)
        return {}

    @channel.AuthBlocked.responder
    def auth_blocked(self, address, seconds):
        self.worker.logins.block(address, seconds)
        return {}

    @channel.ProbeServer.responder
    def probe_server(self, pool, server):
        found = ejection.find_server(self.worker.proxy, pool, server)
        if found is None:
            return {"ok": True}  # not ours any more: nothing keeps it out
        d = Deferred()
        found.probe(lambda ok: d.callback({"ok": ok}))
        return d


class Worker:
    """One worker's state: its proxy, adopted ports, accept mutex and channel."""

    def __init__(self, reactor, layout: dict):
        self.reactor = reactor
        self.layout = layout
        self.slot = layout["slot"]
        self.worker_count = layout.get("workers", 1)
        self.proxy = None
        self.migrations = None  # a state the master sent before the pools were built
        self.ports = []
        self.mutex = None
        self.quickack = False
        self.channel = None
        self.stopping = False
        self.finished = False
        # Failed logins go to the master, which counts them across workers (process/logins.py).
        self.logins = RemoteAuthLimiter(reactor, self._report_login_failure)

    def start(self) -> None:
        fd = self.layout["channel"]
        self.channel = WorkerChannel(self)
        self.reactor.adoptStreamConnection(fd, socket.AF_UNIX, quiet_factory(lambda: self.channel))
        os.set_blocking(fd, False)  # PyPy's adoption made it blocking
        os.close(fd)
        d = self.channel.callRemote(channel.Hello, pid=os.getpid(), slot=self.slot)
        d.addCallback(self._hello)
        d.addCallback(lambda serving: self.channel.callRemote(channel.Ready) if serving else None)
        d.addErrback(self._failed)

    def _hello(self, answer):
        logins.apply_blocks(self.logins, answer["blocked"])
        return self.configure(parse_config(answer["config"], answer["source"]),
                              _migration_state(answer.get("migrations")))

    def _report_login_failure(self, address: str) -> None:
        try:
            self.channel.callRemote(channel.AuthFailed, address=address)
        except Exception:
            pass  # the master's channel is gone: the worker stops anyway

    def _failed(self, failure) -> None:
        log.failure("worker {pid} could not start", failure, pid=os.getpid())
        self.finish(1)

    def configure(self, config, migrations=None):
        """
        Build the pools for C{config} (and the master's L{MigrationState}
        C{migrations}), warm up, then serve the listening sockets
        handed over; a Deferred fires with whether this worker serves (not if
        it was stopped while warming up).
        """
        from twistedproxy.api import Proxy

        glob = config.global_
        if glob.worker_cpu_affinity:
            set_affinity(glob.worker_cpu_affinity[self.slot % len(glob.worker_cpu_affinity)])
        self.quickack = glob.tcp_quickack
        # The master coordinates migrations: this proxy only routes by their state.
        migrations = self.migrations or migrations or MigrationState()
        self.proxy = Proxy(config, self.reactor, migrations=migrations)
        self.proxy.use_logins(self.logins)
        self._share_out()
        # Ready means warm: backend connections are made, the sockets served and Ready
        # said only after it (a connection made before could time out meanwhile).
        seconds = warmup.seconds_for(glob.warmup, replacing=self.layout.get("replacing", False))
        return self.proxy.warm_up(seconds).addCallback(self._serve)

    def _serve(self, report) -> bool:
        if report is not None:
            log.info("worker {pid} (slot {slot}) {warm}", pid=os.getpid(), slot=self.slot, warm=report.describe())
        if self.stopping:
            return False
        stats_workers.warm_up_answers(self.stats)
        for pool in self.proxy.pools.values():
            pool.start()
        glob = self.proxy.config.global_
        mutex_fd = self.layout.get("mutex")
        for name, fd in sorted(self.layout["listen"].items()):
            self.ports.append(adopt_port(self.reactor, fd, _PoolFactory(self, name), one_accept=mutex_fd is not None))
            os.close(fd)
        drop_privileges(glob.user, glob.group)
        if mutex_fd is not None:
            self.mutex = AcceptMutex(self.reactor, mutex_fd, self.slot, lambda: self.ports, self.connections)
            self.mutex.start()
        return True

    def reconfigure(self, config, migrations=None) -> None:
        self.proxy.reconfigure(config, migrations)
        self._share_out()

    def apply_migrations(self, state) -> None:
        """Route by the master's L{MigrationState} C{state} from now on (pools rebuilt get our share-out)."""
        if self.proxy is None:
            self.migrations = state  # before the pools are built: they are built by it
            return
        self.proxy.apply_migrations(state)
        self._share_out()

    def set_worker_count(self, count: int) -> None:
        self.worker_count = count
        self._share_out()

    def _share_out(self) -> None:
        """
        This worker's part of what holds for the whole proxy: its share of each
        pool's C{client_connections}, and the master's say on ejections.
        """
        health = ejection.WorkerHealth(self.channel)
        for factory in self.proxy.factories.values():
            factory.share = (self.slot, max(self.worker_count, 1))
        for pool in self.proxy.pools.values():
            if pool.health is None:
                pool.health = health

    def adopt(self, fd: int, family: int, pool: str, state: str) -> dict:
        """Serve a client handed over by a stopping worker (L{handoff.HandOff}); the answer."""
        if self.stopping or self.proxy is None:
            return {"ok": False, "why": "the receiving worker stops"}
        if pool not in self.proxy.factories:
            return {"ok": False, "why": "no pool %s" % (pool,)}
        try:
            return _PoolFactory(self, pool).adopt(fd, family, state)
        except Exception as e:
            log.failure("cannot adopt a handed-over client")
            return {"ok": False, "why": str(e)}

    def connections(self) -> int:
        """Open client connections, over every pool."""
        if self.proxy is None:
            return 0
        return sum(len(pool.clients) for pool in self.proxy.pools.values())

    def stats(self) -> dict:
        """Per-worker statistics for the master's stats collection (L{twistedproxy.stats.snapshot})."""
        result = stats_workers.worker_snapshot(self.proxy, self.slot)
        result["pid"] = os.getpid()
        result["client_connections"] = self.connections()
        return result

    # -- stopping ---------------------------------------------------------------

    def channel_lost(self) -> None:
        if not self.stopping and not self.finished:
            log.warn("worker {pid}: master channel closed; stopping", pid=os.getpid())
        self.stop(graceful=True)

    def stop(self, graceful: bool) -> None:
        """Stop accepting; C{graceful} lets in-flight requests finish first (bounded)."""
        if self.stopping:
            if not graceful:
                self.finish()
            return
        self.stopping = True
        if self.mutex is not None:
            self.mutex.stop()
        for port in self.ports:
            port.stopListening()
        self.ports = []
        if not graceful or self.proxy is None:
            self.finish()
            return
        timeout = self.proxy.config.global_.worker_shutdown_timeout
        clients = lambda: [c for pool in self.proxy.pools.values() for c in pool.clients]
        # Each client is handed to a serving worker (or closed) once its replies are out.
        self._drain = handoff.Drain(self.reactor, clients, self.channel, self.reactor.seconds() + timeout, self.finish)
        self._drain.start()

    def finish(self, code: int = 0) -> None:
        """Close everything and leave the reactor."""
        if self.finished:
            return
        self.finished = True
        self.exit_code = code
        if self.proxy is not None:
            d = self.proxy.stop()
            d.addBoth(lambda _: self._stop_reactor())
        else:
            self._stop_reactor()

    def _stop_reactor(self) -> None:
        stop_reactor(self.reactor)


def stop_reactor(reactor) -> None:
    """Stop C{reactor}, unless it is already shutting down (SIGTERM)."""
    try:
        reactor.stop()
    except ReactorNotRunning:
        pass


def _migration_state(text):
    """The L{MigrationState} in the master's JSON C{text}; None when the master sent none."""
    return MigrationState.from_dict(json.loads(text)) if text else None


def main() -> int:
    layout = json.loads(os.environ.pop(LAYOUT_ENV))
    if layout.get("spare"):
        command.set_title("cacheproxy: spare worker process")
    else:
        command.set_title("cacheproxy: worker process %d" % (layout["slot"],))
    die_with_parent(layout["master"])
    for signum in (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGPIPE):
        signal.signal(signum, signal.SIG_IGN)

    from twisted.logger import globalLogBeginner

    from twistedproxy.reactor import install as install_reactor

    reactor = install_reactor()
    logs.set_level(logs.parse_level(layout.get("level", "info")))
    output = layout.get("output")
    globalLogBeginner.beginLoggingTo([logs.filtered_observer(output)], redirectStandardIO=False)
    quiet_amp_logs()
    RefusalLog(reactor).start()
    workers = []

    def on_signal(handler):
        return lambda signum, frame: reactor.callFromThread(handler)

    def serve(layout):
        """Be the worker of C{layout}'s slot."""
        command.set_title("cacheproxy: worker process %d" % (layout["slot"],))
        logs.set_level(logs.parse_level(layout.get("level", "info")))  # a spare's may have changed since
        worker = Worker(reactor, layout)
        workers.append(worker)
        signal.signal(signal.SIGQUIT, on_signal(lambda: worker.stop(graceful=True)))
        worker.start()

    signal.signal(signal.SIGUSR1, on_signal(logs.reopen))
    if layout.get("spare"):
        from twistedproxy.api import warm_up

        spare.preload()
        signal.signal(signal.SIGQUIT, on_signal(lambda: stop_reactor(reactor)))  # a spare has nothing to finish
        reactor.callWhenRunning(spare.Standby(reactor, layout, serve, lambda config: warm_up(config, reactor)).start)
    else:
        reactor.callWhenRunning(serve, layout)
    reactor.addSystemEventTrigger("before", "shutdown", lambda: [worker.finish() for worker in workers])
    reactor.run()
    return getattr(workers[0], "exit_code", 0) if workers else 0


if __name__ == "__main__":
    sys.exit(main())
