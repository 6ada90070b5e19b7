"""
The master process (nginx model): runs C{global.worker_processes} workers
(L{twistedproxy.process.worker}) on sockets it owns, and reloads, upgrades and
stops them without dropping clients.

The master wires rooms of their own:

  - L{supervisor}: the workers (spawn, respawn with crash-loop backoff,
    resize, rollover to a new generation, one broadcast to the live ones);
  - L{listeners}: the listening sockets handed to each worker slot
    (C{reuseport}: one SO_REUSEPORT socket per slot and pool; C{shared}: one
    socket for all, UNIX sockets always shared, optionally the accept mutex);
  - L{upgrade}: SIGUSR2, both as the old and as the new master;
  - L{statistics}: the workers' counters collected, kept and served;
  - L{ejection}: backend failures counted across workers.

What stays here: the configuration and its reload, signals, the control
endpoint (the master provides L{IProxyControl}), the log level, status and
stop, and how a worker process is launched.

Signals: SIGHUP reopen logs and reload, SIGUSR2 binary upgrade, SIGQUIT
graceful stop, SIGTERM/SIGINT fast stop, SIGUSR1 reopen logs, SIGTTIN/SIGTTOU
log level up/down.  Each is logged as nutcracker logs it, then what was done.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import sys

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import ConnectionDone, ConnectionLost, ReactorNotRunning
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp
from zope.interface import implementer

from twistedproxy import logs, signals
from twistedproxy.config import ConfigError, load_config_text
from twistedproxy.control.interface import IProxyControl
from twistedproxy.migration.coordinator import Coordinator
from twistedproxy.migration.state import file_store
from twistedproxy.net.channels import quiet_amp_logs, quiet_factory
from twistedproxy.process import accept_mutex, channel, command, ejection, handoff, logins, nursery, spare
from twistedproxy.process.listeners import INHERIT_ENV, ListeningSockets, inherited_sockets
from twistedproxy.process.statistics import MasterStats
from twistedproxy.process.supervisor import Supervisor, SupervisorEvents
from twistedproxy.process.upgrade import Upgrade
from twistedproxy.process.worker import LAYOUT_ENV
from twistedproxy.stats import server as stats_server

log = Logger()

# Global keys that change what workers are started with: a change rolls the workers over.
_ROLLOVER_KEYS = ("worker_cpu_affinity", "listen_mode", "accept_mutex", "tcp_quickack", "user", "group")


def check_global(config, path: str) -> None:
    """What the loader cannot know: the process model's limits and accounts; raises ConfigError."""
    glob = config.global_
    problems = []
    if glob.worker_processes < 1:
        problems.append("%s: worker_processes 0 (single process) needs a restart" % (path,))
    if glob.worker_processes > accept_mutex.SLOTS:
        problems.append("%s: at most %d workers" % (path, accept_mutex.SLOTS))
    if glob.user:
        import pwd

        try:
            pwd.getpwnam(glob.user)
        except KeyError:
            problems.append("%s: global.user: no user %r" % (path, glob.user))
    if glob.group:
        import grp

        try:
            grp.getgrnam(glob.group)
        except KeyError:
            problems.append("%s: global.group: no group %r" % (path, glob.group))
    if problems:
        raise ConfigError(problems)


def _listen_layout(config) -> tuple:
    return tuple((pool.name, pool.listen, pool.backlog) for pool in config.listening)


class MasterChannel(amp.AMP):
    """The master's end of one worker's AMP channel."""

    def __init__(self, master, worker):
        amp.AMP.__init__(self)
        self.master = master
        self.worker = worker

    @channel.Hello.responder
    def hello(self, pid, slot):
        self.worker.hello = True
        # From now on every change of the migrations' state reaches this worker too.
        return {"config": self.master.config_text, "source": self.master.config_path,
                "blocked": self.master.logins.blocks(), "migrations": self.master.migrations_json()}

    @channel.Ready.responder
    def ready(self):
        self.master.supervisor.worker_ready(self.worker)
        return {}

    @channel.ServerFailed.responder
    def server_failed(self, pool, server):
        self.master.ejections.failed(pool, server)
        return {}

    @channel.ServerRecovered.responder
    def server_recovered(self, pool, server):
        self.master.ejections.recovered(pool, server)
        return {}

    @channel.AuthFailed.responder
    def auth_failed(self, address):
        self.master.logins.failed(address)
        return {}

    @handoff.HandOff.responder
    def hand_off(self, fd, family, listen, pool, state):
        return handoff.relay(self.master, self.worker, fd, family, listen, pool, state)


class _Workers:
    """The master's migration participants: its workers, each told over its channel (L{channel.ApplyMigrations})."""

    def __init__(self, master):
        self.master = master

    def apply(self, state):
        master = self.master
        # Every worker that has its configuration, the retiring ones too: they serve until they drain.
        workers = [w for w in master.supervisor.all_workers() if w.hello and w.state != "gone"]

        def check(results):
            # A worker that died meanwhile is no failure: its replacement gets the state in its Hello.
            failed = ["worker %s: %s" % (worker.pid, answer.getErrorMessage()) for worker, ok, answer in results
                      if not ok and worker.state not in ("gone", "stopping") and not master.stopping
                      and not answer.check(ConnectionDone, ConnectionLost)]
            if failed:
                raise RuntimeError("; ".join(failed))  # a dead worker's replacement gets the state in its Hello

        return master.supervisor.broadcast(channel.ApplyMigrations, workers,
                                           migrations=json.dumps(state.to_dict())).addCallback(check)


@implementer(IProxyControl)
class MasterService(service.Service, SupervisorEvents):
    """
    The master: C{makeService} returns it when C{global.worker_processes} > 0.

    @ivar supervisor: the L{Supervisor} of the workers.
    @ivar listening: the L{ListeningSockets} the workers serve.
    @ivar stats: the L{MasterStats} (totals, stats endpoints).
    @ivar upgrade: the L{Upgrade} room.
    """

    def __init__(self, config, options, reactor=None, config_text=None):
        self.config_path = os.path.abspath(options["conf-file"])
        if config_text is None:
            # Workers get the file's text: re-read it with its parse, so both agree.
            config_text, config = load_config_text(self.config_path)
        self.config = config
        self.config_text = config_text
        check_global(config, self.config_path)
        self.options = options
        if reactor is None:
            from twisted.internet import reactor
        self.reactor = reactor
        self.listening = ListeningSockets()
        self.supervisor = Supervisor(reactor, self._launch, owner=self,
                                     shutdown_timeout=config.global_.worker_shutdown_timeout, assign=self._assign)
        self.supervisor.count = config.global_.worker_processes
        self.stats = MasterStats(self, reactor)
        self.upgrade = Upgrade(self, reactor)
        self.ejections = ejection.Ejections(self)  # backend failures counted across workers
        self.logins = logins.MasterLogins(self)  # failed logins counted across workers
        self.handoff_turn = -1  # the last worker (index) a handed-over client went to
        self.started_at = 0.0
        self.control_port = None
        self.last_reload = {"ok": None, "error": "", "time": None}
        self.stopped = defer.Deferred()
        self._privileged = False
        # nutcracker's -p: this master's pid, at PATH.oldbin while an upgrade replaces it.
        self.pid_file = os.path.abspath(options["pid-file"]) if options.get("pid-file") else None
        # Online migrations: the workers route by their state, the master runs them (and keeps
        # them in the state directory); a kept state the file contradicts refuses the start.
        self.coordinator = Coordinator(reactor, _Workers(self), file_store(config, self.config_path))
        self.coordinator.restore(config)

    # -- what the other rooms read ------------------------------------------------

    @property
    def workers(self) -> dict:
        """slot -> the current worker of that slot."""
        return self.supervisor.workers

    @property
    def worker_count(self) -> int:
        return self.supervisor.count

    @property
    def stopping(self) -> bool:
        return self.supervisor.stopping

    @property
    def heir(self):
        """The new master of an upgrade, once it serves (handed-over clients go there), or None."""
        return self.upgrade.heir

    def live_workers(self) -> list:
        """The workers that answer commands: said hello, not gone."""
        return self.supervisor.live_workers()

    # -- start ------------------------------------------------------------------

    def privilegedStartService(self):
        """Bind (or inherit) the listening sockets and the control socket."""
        self._privileged = True
        inherited = inherited_sockets(os.environ)
        os.environ.pop(INHERIT_ENV, None)
        self.upgrade.take_environment()
        self.listening.ensure(self.config, self.worker_count, inherited)
        self.stats.bind(self.config, inherited)
        for sock in inherited.values():
            sock.close()  # an upgrade from a configuration with more sockets
        self._open_control()
        service.Service.privilegedStartService(self)

    def startService(self):
        if not self._privileged:
            try:
                self.privilegedStartService()
            except Exception:
                log.failure("cacheproxy master cannot start")
                self.reactor.callLater(0, self._stop_reactor)
                return
        service.Service.startService(self)
        quiet_amp_logs()
        command.set_title("cacheproxy: master process %s" % (command.command_line(),))
        if self.pid_file:
            command.write_pid_file(self.pid_file)
        self.started_at = self.reactor.seconds()
        self._install_signals()
        self.listening.setup_mutex(self.config)
        self.upgrade.listen_to_old_master()
        self.supervisor.start(self.worker_count)
        self.supervisor.want_spare(self.config.global_.spare_worker)  # started once the workers are ready
        self.coordinator.start()
        if not self.upgrade.inheriting:
            self.stats.serve()
        # else (an upgrade) once our workers are ready: the old master answers till then.
        self.stats.start_loop((self.options.get("stats-interval") or 0) / 1000.0)
        log.info("cacheproxy master {pid} started {n} workers ({mode})",
                 pid=os.getpid(), n=self.worker_count, mode=self.config.global_.listen_mode)
        command.daemon_started()

    def _install_signals(self):
        def hangup():
            # nutcracker's HUP (logrotate's postrotate), then nginx's reload.
            self.reopen_logs()
            self.reload()

        def upgrade():
            ok, error = self.start_upgrade()
            if not ok:
                log.warn("no upgrade: {error}", error=error)

        # nutcracker's words for what it does on a signal; what we did is logged next.
        handlers = {
            signal.SIGHUP: ("reopening log file", hangup),
            signal.SIGUSR2: ("", upgrade),
            signal.SIGQUIT: ("exiting", lambda: self.stop(graceful=True)),
            signal.SIGINT: ("exiting", None),  # the reactor stops: stopService
            signal.SIGTERM: ("exiting", None),
            signal.SIGUSR1: ("", self.reopen_logs),
            signal.SIGTTIN: ("up logging level", lambda: self.step_log_level(1)),
            signal.SIGTTOU: ("down logging level", lambda: self.step_log_level(-1)),
        }
        signals.install(self.reactor, handlers)

    def _open_control(self):
        path = self.config.global_.control
        if not path:
            return
        from twistedproxy.control.server import listen_control

        self.control_port = listen_control(self.reactor, path, self, self.config.global_.control_mode)

    def _close_control(self, path=None) -> None:
        """Stop serving the control socket; with C{path}, remove its file (see L{stop_control})."""
        if self.control_port is not None:
            from twistedproxy.control.server import stop_control

            port, self.control_port = self.control_port, None
            stop_control(port, path)

    def reopen_control(self) -> None:
        """Listen on the control path again (a failed upgrade's new master may have taken it)."""
        self._close_control()
        self._open_control()

    # -- workers: how one is launched, and what the supervisor tells us ---------------

    def _slot_layout(self, slot: int, replacing: bool):
        """
        What the worker of C{slot} is started with: its layout (descriptors as
        positions, L{spare.placed}) and the master's descriptors in that order.
        """
        descriptors = list(self.listening.fds_for(self.config, slot).items())
        layout = {"master": os.getpid(), "slot": slot, "workers": self.worker_count, "channel": 3,
                  "listen": {name: position for position, (name, _) in enumerate(descriptors)},
                  "mutex": None, "level": logs.current_level().name, "output": self.options.get("output"),
                  "replacing": replacing}
        fds = [fd for _, fd in descriptors]
        if self.listening.use_mutex:
            layout["mutex"] = len(fds)
            fds.append(self.listening.mutex_fd)
        return layout, fds

    def _launch(self, worker, replacing: bool) -> None:
        """
        The supervisor's spawner: start C{worker}'s process on its slot's
        sockets, with its channel; a spare (no slot) with its channel only,
        which L{_assign} gives it a slot on.
        """
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds = {1: 1, 2: 2, 3: child.fileno()}
        if worker.slot is None:
            # It warms up on the pools of the file (the master's configuration, unless edited since).
            layout = {"master": os.getpid(), "channel": 3, "spare": True, "config": self.config_path,
                      "level": logs.current_level().name, "output": self.options.get("output")}
        else:
            layout, fds = self._slot_layout(worker.slot, replacing)
            numbers = list(range(4, 4 + len(fds)))
            child_fds.update(zip(numbers, fds))
            layout = spare.placed(layout, numbers)
        env = dict(os.environ)
        env["PYTHONPATH"] = command.package_root() + os.pathsep + env.get("PYTHONPATH", "")
        env[LAYOUT_ENV] = json.dumps(layout)  # not on the command line: ps shows the worker's title
        nursery.child_environ(env)  # a master under twistd did not run itself again with it
        argv = [sys.executable, "-m", "twistedproxy.process.worker"]
        try:
            self.reactor.spawnProcess(worker, sys.executable, argv, env=env, path=os.getcwd(), childFDs=child_fds)
        finally:
            child.close()
        worker.pid = worker.transport.pid
        if worker.slot is None:
            worker.waiting_channel = spare.SpareChannel(parent)  # until it takes a slot
        else:
            self._open_channel(worker, parent)

    def _assign(self, worker, slot: int) -> bool:
        """
        The supervisor's assigner: the spare C{worker} takes C{slot}, of a
        crashed worker, if it is warm; whether it did (OSError if it cannot).
        """
        if not worker.waiting_channel.warm():
            return False  # a new process is as quick as a spare still warming up
        layout, fds = self._slot_layout(slot, replacing=True)
        parent = worker.waiting_channel.give(layout, fds)
        worker.waiting_channel = None
        self._open_channel(worker, parent)
        return True

    def _open_channel(self, worker, parent) -> None:
        """Speak AMP with C{worker} on C{parent}, the master's end of its socketpair (closed here: adopted)."""
        worker.channel = MasterChannel(self, worker)
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, quiet_factory(lambda: worker.channel))
        parent.setblocking(False)  # PyPy's adoption made it blocking
        parent.close()

    def worker_ready(self, worker) -> None:
        self.ejections.welcome(worker)

    def generation_ready(self) -> None:
        self.upgrade.serving()
        self._prune_sockets()

    def worker_exited(self, worker) -> None:
        if worker.waiting_channel is not None:
            worker.waiting_channel.close()  # a spare that never took a slot
        if worker.slot is None:
            return
        self.listening.slot_gone(worker.slot)
        self.stats.totals.retire(worker.pid)
        self.upgrade.hand_on_totals()  # an old master's counters grow as its workers exit

    def worker_retired(self, worker) -> None:
        self._prune_sockets()

    def all_stopped(self) -> None:
        self._finish_stop()

    def before_graceful_stop(self, worker):
        return self.stats.collect([worker])  # its counters go to the totals first (they outlive it)

    def _prune_sockets(self) -> None:
        """Close sockets no worker may use any more (after a rollover or fewer workers)."""
        if self.supervisor.settled:
            self.listening.prune(self.config, self.worker_count)

    # -- reload, resize -----------------------------------------------------------

    def reload(self):
        """
        Re-read the configuration file: an invalid one changes nothing; a valid
        one is pushed to the workers, or rolls them over when listen addresses
        or worker start-up settings changed.  Returns a Deferred firing with
        (ok, error text) once the live workers have applied it (or the new
        generation has been started).
        """
        path = self.config_path
        try:
            text, config = load_config_text(path)
            check_global(config, path)
        except (ConfigError, OSError) as e:
            return defer.succeed(self._refused(str(e)))
        try:
            # Pools whose change waits for their migration: refused, the others apply.
            waiting = self.coordinator.reload(config)
        except ConfigError as e:
            return defer.succeed(self._refused(str(e)))
        old = self.config
        self.ejections.configure(config)
        self.logins.configure(config)
        self.supervisor.shutdown_timeout = config.global_.worker_shutdown_timeout
        if config.global_.spare_worker != old.global_.spare_worker:
            self.supervisor.want_spare(config.global_.spare_worker)
        rollover = _listen_layout(old) != _listen_layout(config) or any(
            getattr(old.global_, key) != getattr(config.global_, key) for key in _ROLLOVER_KEYS)
        if rollover:
            try:
                self._rollover(config, text)
            except OSError as e:
                self.coordinator.reloaded(False, "cannot listen: %s" % (e,))
                return defer.succeed(self._refused("cannot listen: %s" % (e,)))
            # The new generation gets the migrations in its Hello; the old one routes by them while it drains.
            applied = _Workers(self).apply(self.coordinator.state).addBoth(lambda _: [])
        else:
            self.config, self.config_text = config, text
            pushed = [w for w in self.supervisor.all_workers() if w.hello and w.state in ("starting", "ready")]
            applied = self.supervisor.broadcast(channel.Reconfigure, pushed, config=text, source=path,
                                                migrations=self.migrations_json())
            self._resize(config.global_.worker_processes)

        if stats_server.moved(old.global_, config.global_):
            self.stats.move(config, self.listening.close)

        def done(results):
            failed = [error for error in (self._reconfigured(*result) for result in results) if error]
            # Every worker holds the new migrations' plans: they go on (or pause, with why).
            self.coordinator.reloaded(not failed, "; ".join(failed))
            failed += waiting
            if failed:
                # The master and the other workers run the new file: the reload is
                # reported as failed so that scripts (cacheproxyctl's exit 1) notice.
                error = "; ".join(failed)
                self._record_reload(False, error)
                return False, error
            log.info("reloaded {path} ({how})", path=path, how="workers rolled over" if rollover else "applied live")
            self._record_reload(True, "")
            return True, ""

        return applied.addCallback(done)

    def _refused(self, error):
        log.error("reload of {path} refused; the running configuration stays:\n{error}",
                  path=self.config_path, error=error)
        self._record_reload(False, error)
        return False, error

    def _reconfigured(self, worker, ok, answer) -> str:
        """A worker's answer to a pushed configuration (or the Failure of the push): "" if applied, else what went wrong."""
        if not ok:
            if worker.state in ("gone", "stopping") or self.stopping:
                return ""  # a stop cut it short
            log.failure("worker {pid} could not apply the configuration", answer, pid=worker.pid)
            return "worker %s could not apply the configuration: %s" % (worker.pid, answer.getErrorMessage())
        if not answer["ok"]:
            log.error("worker {pid} refused the configuration: {error}", pid=worker.pid, error=answer["error"])
            return "worker %s refused the configuration: %s" % (worker.pid, answer["error"])
        self.ejections.welcome(worker)  # its new pools start with every server in
        return ""

    def _record_reload(self, ok, error):
        self.last_reload = {"ok": ok, "error": error, "time": self.reactor.seconds() - self.started_at}

    def _rollover(self, config, text) -> None:
        """Start a new generation of workers on C{config}'s sockets; the old one drains once it is ready."""
        count = config.global_.worker_processes
        self.listening.ensure(config, count)
        self.config, self.config_text = config, text
        self.listening.setup_mutex(config)
        self.supervisor.rollover(count)

    def set_workers(self, count: int):
        """Run C{count} workers from now on (until the next reload); returns (ok, error)."""
        if not 1 <= count <= accept_mutex.SLOTS:
            return False, "the worker count must be from 1 to %d" % (accept_mutex.SLOTS,)
        self._resize(count)
        return True, ""

    def _resize(self, count: int) -> None:
        if count > self.worker_count:
            self.listening.ensure(self.config, count)
        if self.supervisor.resize(count):
            self._prune_sockets()

    # -- upgrade ------------------------------------------------------------------

    def start_upgrade(self):
        """SIGUSR2: start a new master from the current code on our sockets; returns (ok, error)."""
        return self.upgrade.start(dict(self.listening.sockets, **self.stats.sockets))

    def taken_over(self) -> None:
        """The new master of an upgrade serves: its are the sockets' paths, the control path, the stats."""
        self.listening.handed_over = True
        self.coordinator.stop(save=False)  # the new master runs the migrations from the state files now

    # -- online migrations ------------------------------------------------------------

    def migrations_json(self) -> str:
        """The L{MigrationState} the workers route by, as the channel carries it."""
        return json.dumps(self.coordinator.state.to_dict())

    def migration(self, action, pool=None):
        return self.coordinator.control(action, pool)

    # -- logs -------------------------------------------------------------------

    def reopen_logs(self) -> None:
        logs.reopen()
        self.supervisor.signal_all("USR1")
        log.info("log files reopened")

    def set_log_level(self, level: LogLevel) -> None:
        logs.set_level(level)
        self.supervisor.broadcast(channel.SetLogLevel, level=level.name)

    def step_log_level(self, step: int) -> None:
        """SIGTTIN (+1, more verbose) / SIGTTOU (-1)."""
        level = logs.stepped_level(step)
        self.set_log_level(level)
        log.info("log level is now {name}", name=level.name)

    # -- status and stats ----------------------------------------------------------

    def status(self) -> dict:
        now = self.reactor.seconds()
        supervisor = self.supervisor
        return {
            "pid": os.getpid(),
            "uptime": round(now - self.started_at, 3),
            "config": self.config_path,
            "config_digest": hashlib.sha256(self.config_text.encode("utf-8")).hexdigest(),
            "generation": supervisor.generation,
            "worker_processes": supervisor.count,
            "listen_mode": self.config.global_.listen_mode,
            "accept_mutex": self.listening.use_mutex,
            "workers": [w.describe() for _, w in sorted(supervisor.workers.items())],
            "restarts": {str(slot): n for slot, n in sorted(supervisor.restarts.items())},
            "retiring": [w.describe() for w in supervisor.retiring],
            "spare": self._spare_status(),
            "last_reload": self.last_reload,
            "log_level": logs.current_level().name,
            "upgrading": self.upgrade.starting is not None,
            "stopping": self.stopping,
        }

    def _spare_status(self):
        """The spare's part of the status (with whether it is warm: only a warm one takes a slot), or None."""
        worker = self.supervisor.spare
        if worker is None:
            return None
        described = worker.describe()
        try:
            described["warm"] = worker.waiting_channel.warm()  # a spare's, until it takes a slot
        except OSError:
            described["warm"] = False  # it is on its way out
        return described

    def collect_stats(self):
        """A Deferred firing with {pid: the worker's stats} over every live worker."""
        return self.stats.collect().addCallback(lambda answers: {str(w.pid): snap for w, snap in answers.items()})

    def slowlog(self, limit=None):
        return self.stats.sources.slowlog(limit)

    def tune(self, changes, pool=None):
        return self.stats.sources.tune(changes, pool)

    # -- stop -------------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """Stop every worker (C{graceful}: let them finish in-flight requests), then exit."""
        if not self.stopping:
            self.ejections.stop()
            log.info("master {pid}: {how} stop", pid=os.getpid(), how="graceful" if graceful else "fast")
            if self.listening.handed_over:
                # The new master serves the control path and the stats endpoints now.
                self._close_control()
                self.stats.stop_serving()
        self.supervisor.stop(graceful)

    def _finish_stop(self) -> None:
        self.coordinator.stop(save=not self.listening.handed_over)
        self.stats.close(self.listening.close)
        self.listening.close_all()
        # After a hand-over the path is the new master's: only stop serving it.
        self._close_control(None if self.listening.handed_over else self.config.global_.control)
        # The new master of an upgrade gets the final counters before we go.
        self.upgrade.last_hand_on().addBoth(lambda _: self._stopped())

    def _stopped(self) -> None:
        if self.pid_file:
            command.remove_pid_file(self.pid_file)
        self.upgrade.close()
        if not self.stopped.called:
            self.stopped.callback(None)
        self._stop_reactor()

    def _stop_reactor(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:
            pass

    def stopService(self):
        """The reactor is shutting down (SIGTERM/SIGINT, or after our own stop): fast-stop the workers."""
        service.Service.stopService(self)
        if self.stopped.called:
            return None
        self.stop(graceful=False)
        d = defer.Deferred()
        self.stopped.addBoth(lambda _: d.callback(None))
        return d
