"""
The master process (nginx model): owns the listening sockets, runs
C{global.worker_processes} workers (L{twistedproxy.process.worker}), and
reloads, upgrades and stops them without dropping clients.

  - Workers are started with C{reactor.spawnProcess} (same interpreter), their
    listening sockets, AMP channel and accept-mutex file passed as descriptors.
  - A worker that dies is respawned at once; one that dies young again and
    again is respawned with a growing delay (crash-loop backoff).
  - Listen modes: C{reuseport} gives each worker slot its own SO_REUSEPORT
    socket per pool (the kernel balances); C{shared} gives every worker the same
    socket (UNIX sockets are always shared), optionally with the accept mutex.

Signals: SIGHUP reopen logs and reload, SIGUSR2 binary upgrade, SIGQUIT
graceful stop, SIGTERM/SIGINT fast stop, SIGUSR1 reopen logs, SIGTTIN/SIGTTOU
log level up/down.  Each is logged as nutcracker logs it, then what was done.

Upgrade, as nginx does it: the pid file (C{-p}) moves to C{PIDFILE.oldbin}
(removed when this master leaves, moved back if the upgrade fails), and the new
master, started with the operator's own command line, writes C{PIDFILE}.
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
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger, LogLevel
from twisted.protocols import amp

from twistedproxy import logs, signals
from twistedproxy.config import ConfigError, load_config_text
from twistedproxy.process import accept_mutex, channel, command, ejection, handoff, nursery
from twistedproxy.process.channel import quiet_factory
from twistedproxy.process.listeners import (
    INHERIT_ENV,
    bind_socket,
    inherited_sockets,
    is_slot_key,
    reuseport_migration,
    socket_key,
)
from twistedproxy.process.worker import LAYOUT_ENV
from twistedproxy.stats import server as stats_server, workers as stats_workers

log = Logger()

# The pipe on which an upgraded master tells the old one it serves (fd number in env).
READY_ENV = "TWISTEDPROXY_UPGRADE_READY_FD"
# The socket on which the old master sends the new one its counters (fd number in env).
TOTALS_ENV = "TWISTEDPROXY_UPGRADE_TOTALS_FD"
INHERIT_WAIT = 3.0  # seconds a new master waits for the old one's counters before serving stats
HAND_ON_TIMEOUT = 5.0  # seconds an old master waits for the new one to take its last counters
UPGRADE_TIMEOUT = 30.0  # seconds the old master waits for the new one
KILL_GRACE = 3.0  # seconds past a stop's deadline before SIGKILL
YOUNG = 2.0  # a worker dying within this many seconds of its Ready counts towards a crash loop
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0

# Global keys that change what workers are started with: a change rolls the workers over.
_ROLLOVER_KEYS = ("worker_cpu_affinity", "listen_mode", "accept_mutex", "tcp_quickack", "user", "group")


def _take_fd(name: str):
    """The descriptor number an upgrading master left in environment variable C{name} (removed), or None."""
    value = os.environ.pop(name, None)
    return int(value) if value and value.isdigit() else None


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


def backoff_delay(failures: int) -> float:
    """
    Seconds before respawning a worker that died young C{failures} times in a
    row: at once the first time, then 0.1 s doubling up to 10 s.
    """
    if failures <= 1:
        return 0
    return min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (failures - 2))


def _listen_layout(config) -> tuple:
    return tuple((pool.name, pool.listen, pool.backlog) for pool in config.pools)


def exit_reason(reason) -> str:
    """What ended a process, for people: C{reason} is the Failure of C{processEnded}."""
    sig = getattr(reason.value, "signal", None)
    if sig:
        try:
            return "killed by signal %d (%s)" % (sig, signal.Signals(sig).name)
        except ValueError:
            return "killed by signal %d" % (sig,)
    return "exited with code %s" % (getattr(reason.value, "exitCode", None) or 0,)


def parse_level(text: str) -> LogLevel:
    """A log level from its name (debug, info, warn, error, critical) or a nutcracker C{-v} number."""
    text = text.strip().lower()
    if text.isdigit():
        return logs.level_for_verbosity(int(text))
    try:
        return LogLevel.levelWithName({"warning": "warn"}.get(text, text))
    except Exception:
        raise ValueError("unknown log level %r (debug, info, warn, error, critical or 0..11)" % (text,))


class WorkerProcess(ProcessProtocol):
    """One spawned worker, seen from the master."""

    def __init__(self, master, slot: int, generation: int):
        self.master = master
        self.slot = slot
        self.generation = generation
        self.pid = None
        self.state = "starting"  # starting, ready, stopping, gone
        self.started_at = master.reactor.seconds()
        self.channel = None
        self.hello = False
        self.served = False  # said Ready (the state is "gone" once it ended)
        self.ready_at = None  # when it said Ready (after its warm-up)
        self.kill_call = None

    def processEnded(self, reason):
        self.state = "gone"
        if self.kill_call is not None and self.kill_call.active():
            self.kill_call.cancel()
        if self.channel is not None and self.channel.transport is not None:
            self.channel.transport.loseConnection()
        self.master.worker_ended(self, reason)

    def signal(self, signum) -> None:
        if self.state != "gone" and self.transport is not None:
            try:
                self.transport.signalProcess(signum)
            except Exception:
                pass  # exited meanwhile

    def stop(self, graceful: bool, timeout: float) -> None:
        """Ask the worker to stop; SIGKILL it if still there after C{timeout} + grace."""
        if self.state == "gone":
            return
        self.state = "stopping"
        if graceful and self.channel is not None and self.hello:
            # Its counters so far go to the master's totals first (they outlive it).
            # A lost channel makes the worker stop on its own; kill_call is the backstop.
            d = stats_workers.collect(self.master, [self])
            d.addCallback(lambda _: self.channel.callRemote(channel.Stop, graceful=True))
            d.addErrback(lambda _: None)
        else:
            self.signal("TERM")
        if self.kill_call is None:
            delay = (timeout if graceful else 0) + KILL_GRACE
            self.kill_call = self.master.reactor.callLater(delay, self.signal, "KILL")

    def describe(self) -> dict:
        now = self.master.reactor.seconds()
        return {"slot": self.slot, "pid": self.pid, "state": self.state,
                "generation": self.generation, "uptime": round(now - self.started_at, 3),
                "restarts": self.master.restarts.get(self.slot, 0), "last_exit": self.master.exits.get(self.slot)}


class MasterChannel(amp.AMP):
    """The master's end of one worker's AMP channel."""

    def __init__(self, worker: WorkerProcess):
        amp.AMP.__init__(self)
        self.worker = worker

    @channel.Hello.responder
    def hello(self, pid, slot):
        self.worker.hello = True
        master = self.worker.master
        return {"config": master.config_text, "source": master.config_path}

    @channel.Ready.responder
    def ready(self):
        self.worker.master.worker_ready(self.worker)
        return {}

    @channel.ServerFailed.responder
    def server_failed(self, pool, server):
        self.worker.master.ejections.failed(pool, server)
        return {}

    @channel.ServerRecovered.responder
    def server_recovered(self, pool, server):
        self.worker.master.ejections.recovered(pool, server)
        return {}

    @handoff.HandOff.responder
    def hand_off(self, fd, family, listen, pool, state):
        return handoff.relay(self.worker.master, self.worker, fd, family, listen, pool, state)


class _UpgradeProtocol(ProcessProtocol):
    """The new master of an upgrade, seen from the old one."""

    def __init__(self, master):
        self.master = master
        self.ready = False
        self.buffer = b""
        self.heir = None  # AMP to the new master (counters are sent on it once it serves)

    def childDataReceived(self, fd, data):
        self.buffer += data
        if not self.ready and b"ready" in self.buffer:
            self.ready = True
            self.master.upgrade_ready(self)

    def processEnded(self, reason):
        if not self.ready:
            self.master.upgrade_failed(self, reason.value)


class _Inheritance(amp.AMP):
    """A new master's end of the channel on which the old master sends its counters."""

    def __init__(self, master):
        amp.AMP.__init__(self)
        self.master = master

    @channel.InheritTotals.responder
    def inherit(self, stats):
        self.master.inherited_totals(json.loads(stats))
        return {}

    @handoff.HandOff.responder
    def hand_off(self, fd, family, listen, pool, state):
        # A client of the old master's draining workers: to one of ours.
        return handoff.relay(self.master, None, fd, family, listen, pool, state)

    def connectionLost(self, reason):
        amp.AMP.connectionLost(self, reason)
        self.master.inherited_totals(None)  # the old master is gone: serve with what came


class MasterService(service.Service):
    """
    The master: C{makeService} returns it when C{global.worker_processes} > 0.

    @ivar workers: slot -> the current L{WorkerProcess} of that slot.
    @ivar retiring: workers of an older generation (or removed slots), stopping.
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
        self._reactor = reactor
        self.worker_count = config.global_.worker_processes
        self.generation = 0
        self.workers = {}
        self.retiring = set()
        self.sockets = {}  # socket_key -> listening socket
        self.mutex_fd = None
        self.use_mutex = False
        self.failures = {}  # slot -> consecutive young deaths
        self.restarts = {}  # slot -> times its worker died unasked and was respawned
        self.exits = {}  # slot -> how the slot's last worker ended (exit_reason), with its pid
        self.respawn_calls = {}  # slot -> pending delayed respawn
        self.rollover_pending = None  # the generation whose readiness retires the previous one
        self.handoff_turn = -1  # the last worker (index) a handed-over client went to
        self.started_at = 0.0
        self.stopping = False
        self.upgrade = None
        self.handed_over = False  # an upgraded master took the sockets: leave paths alone
        self.ready_fd = None
        self.totals_fd = None  # an upgrade: where the old master's counters arrive
        self.heir = None  # the new master's AMP channel, while handing over
        self.stats_waiting = None  # a new master: the call that serves stats if no counters came
        self.control_port = None
        self.stats_endpoints = {}  # kind -> ListenSpec (stats_server.endpoints)
        self.stats_sockets = {}  # stats_key -> listening socket, passed on upgrade too
        self.stats_ports = []  # the ports serving them
        self.stats_totals = stats_workers.Totals()
        self.stats_loop = None  # collects the workers' stats every -i milliseconds
        self.last_reload = {"ok": None, "error": "", "time": None}
        self.stopped = defer.Deferred()
        self._privileged = False
        # nutcracker's -p: this master's pid, at PATH.oldbin while an upgrade replaces it.
        self.pid_file = os.path.abspath(options["pid-file"]) if options.get("pid-file") else None
        self.ejections = ejection.Ejections(self)  # backend failures counted across workers

    @property
    def reactor(self):
        if self._reactor is None:
            from twisted.internet import reactor

            self._reactor = reactor
        return self._reactor

    # -- start ------------------------------------------------------------------

    def privilegedStartService(self):
        """Bind (or inherit) the listening sockets and the control socket."""
        self._privileged = True
        inherited = inherited_sockets(os.environ)
        os.environ.pop(INHERIT_ENV, None)
        self.ready_fd = _take_fd(READY_ENV)
        self.totals_fd = _take_fd(TOTALS_ENV)
        self.sockets = self._open_sockets(self.config, self.worker_count, inherited)
        opts = self.options
        self.stats_endpoints = stats_server.endpoints(
            opts.get("stats-port"), opts.get("stats-addr", "0.0.0.0"), self.config.global_.stats_http)
        self.stats_sockets = stats_server.bind(self.stats_endpoints, inherited)
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
        channel.quiet_amp_logs()
        command.set_title("cacheproxy: master process %s" % (command.command_line(),))
        if self.pid_file:
            command.write_pid_file(self.pid_file)
        self.started_at = self.reactor.seconds()
        self._install_signals()
        self._setup_mutex(self.config)
        if self.totals_fd is not None:
            inheritance = _Inheritance(self)
            self.reactor.adoptStreamConnection(self.totals_fd, socket.AF_UNIX, quiet_factory(lambda: inheritance))
            os.close(self.totals_fd)  # the reactor holds its own duplicate
            self.totals_fd = None
        self.generation = 1
        self.rollover_pending = 1
        for slot in range(self.worker_count):
            self._spawn(slot)
        if self.ready_fd is None:
            self._serve_stats()
        # else (an upgrade) once our workers are ready: the old master answers till then.
        interval = (self.options.get("stats-interval") or 0) / 1000.0
        if interval > 0:
            self.stats_loop = LoopingCall(stats_workers.collect, self)
            self.stats_loop.clock = self.reactor
            self.stats_loop.start(interval, now=False)
        log.info("cacheproxy master {pid} started {n} workers ({mode})",
                 pid=os.getpid(), n=self.worker_count, mode=self.config.global_.listen_mode)
        command.daemon_started()

    def _serve_stats(self) -> None:
        self.stats_ports = stats_server.adopt(
            self.reactor, stats_workers.WorkerSources(self), self.stats_endpoints, self.stats_sockets)

    def _move_stats(self, config) -> None:
        """
        Serve the stats endpoints where C{config} puts them (a reload changed
        C{stats_http}): sockets that stay are kept, a new address is bound (or
        logged and skipped, as at start), a dropped one is closed.  Connections
        already accepted finish where they are.
        """
        opts = self.options
        endpoints = stats_server.endpoints(
            opts.get("stats-port"), opts.get("stats-addr", "0.0.0.0"), config.global_.stats_http)
        sockets = stats_server.bind(endpoints, dict(self.stats_sockets))
        serving = bool(self.stats_ports)
        for port in self.stats_ports:
            port.stopListening()
        self.stats_ports = []
        for key, sock in self.stats_sockets.items():
            if key not in sockets:
                self._close_socket(sock)
        self.stats_endpoints, self.stats_sockets = endpoints, sockets
        if serving:  # else an upgrade still waits for its workers: they start serving then
            self._serve_stats()
        log.info("stats endpoints: {where}",
                 where=", ".join("%s %s" % (kind, spec) for kind, spec in endpoints.items()) or "none")

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

        self.control_port = listen_control(self.reactor, path, self)

    def _setup_mutex(self, config):
        """The accept mutex serialises shared sockets only: reuseport sockets have one worker each."""
        glob = config.global_
        self.use_mutex = glob.accept_mutex and glob.listen_mode == "shared"
        if self.use_mutex and self.mutex_fd is None:
            self.mutex_fd = accept_mutex.create_file()

    # -- sockets ----------------------------------------------------------------

    def _keys(self, config, count) -> dict:
        """socket_key -> (pool config, slot or None) for C{config} with C{count} workers."""
        keys = {}
        shared = config.global_.listen_mode == "shared"
        for pool in config.pools:
            if shared or pool.listen.is_unix:
                keys[socket_key(pool.listen, None)] = (pool, None)
            else:
                for slot in range(count):
                    keys[socket_key(pool.listen, slot)] = (pool, slot)
        return keys

    def _open_sockets(self, config, count, available) -> dict:
        """
        The sockets C{config} needs: taken from C{available} (key -> socket,
        consumed) when there, bound otherwise; on a bind error every socket
        bound here is closed and the error raised.
        """
        opened = {}
        made = []
        try:
            for key, (pool, slot) in self._keys(config, count).items():
                sock = available.pop(key, None)
                if sock is None:
                    # SO_REUSEPORT on every TCP socket: lets a reuseport group grow
                    # and a rollover bind the same address in the other mode.
                    sock = bind_socket(pool.listen, pool.backlog, reuseport=not pool.listen.is_unix)
                    made.append(sock)
                opened[key] = sock
        except OSError:
            for sock in made:
                sock.close()
            raise
        return opened

    def _fds_for(self, config, slot) -> dict:
        """pool name -> the master's descriptor that worker C{slot} serves."""
        shared = config.global_.listen_mode == "shared"
        fds = {}
        for pool in config.pools:
            one = shared or pool.listen.is_unix
            fds[pool.name] = self.sockets[socket_key(pool.listen, None if one else slot)].fileno()
        return fds

    def _prune_sockets(self) -> None:
        """Close sockets no worker may use any more (after a rollover or fewer workers)."""
        if self.retiring or self.rollover_pending:
            return
        wanted = self._keys(self.config, self.worker_count)
        closing = [key for key in self.sockets if key not in wanted]
        slots = sum(1 for key in closing if is_slot_key(key))
        if slots and reuseport_migration() is False:
            log.warn(
                "closing {count} reuseport socket(s): connections still queued on them are reset;"
                " set net.ipv4.tcp_migrate_req=1 to have the kernel move them to the other workers",
                count=slots,
            )
        for key in closing:
            self._close_socket(self.sockets.pop(key))

    def _close_socket(self, sock) -> None:
        path = None
        if sock.family == socket.AF_UNIX and not self.handed_over:
            path = sock.getsockname()
        sock.close()
        if path:
            try:
                os.unlink(path)
            except OSError:
                pass

    # -- workers ----------------------------------------------------------------

    def _spawn(self, slot: int, replacing: bool = False) -> WorkerProcess:
        self.respawn_calls.pop(slot, None)
        worker = WorkerProcess(self, slot, self.generation)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds = {1: 1, 2: 2, 3: child.fileno()}
        layout = {"master": os.getpid(), "slot": slot, "workers": self.worker_count, "channel": 3, "listen": {},
                  "mutex": None, "level": logs.current_level().name, "output": self.options.get("output"),
                  "replacing": replacing}
        next_fd = 4
        for name, fd in self._fds_for(self.config, slot).items():
            child_fds[next_fd] = fd
            layout["listen"][name] = next_fd
            next_fd += 1
        if self.use_mutex:
            child_fds[next_fd] = self.mutex_fd
            layout["mutex"] = next_fd
        env = dict(os.environ)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        env[LAYOUT_ENV] = json.dumps(layout)  # not on the command line: ps shows the worker's title
        nursery.child_environ(env)  # a master under twistd did not run itself again with it
        argv = [sys.executable, "-m", "twistedproxy.process.worker"]
        try:
            self.reactor.spawnProcess(worker, sys.executable, argv, env=env, path=os.getcwd(), childFDs=child_fds)
        finally:
            child.close()
        worker.pid = worker.transport.pid
        worker.channel = MasterChannel(worker)
        self.reactor.adoptStreamConnection(parent.fileno(), socket.AF_UNIX, quiet_factory(lambda: worker.channel))
        parent.setblocking(False)  # PyPy's adoption made it blocking
        parent.close()
        self.workers[slot] = worker
        log.debug("worker {pid} started in slot {slot}", pid=worker.pid, slot=slot)
        return worker

    def worker_ready(self, worker: WorkerProcess) -> None:
        worker.served = True
        worker.ready_at = self.reactor.seconds()
        if worker.state == "starting":
            worker.state = "ready"
        log.debug("worker {pid} ready", pid=worker.pid)
        self.ejections.welcome(worker)
        self._check_generation_ready()

    def _check_generation_ready(self) -> None:
        if self.rollover_pending is None or self.stopping:
            return
        current = [w for w in self.workers.values() if w.generation == self.rollover_pending]
        if len(current) < self.worker_count or any(w.state != "ready" for w in current):
            return
        self.rollover_pending = None
        for worker in list(self.retiring):
            worker.stop(graceful=True, timeout=self.config.global_.worker_shutdown_timeout)
        if self.ready_fd is not None:
            # We are an upgrade: tell the old master it can leave, and serve the
            # stats once its counters are in (they must not go backwards).
            self.stats_waiting = self.reactor.callLater(INHERIT_WAIT, self.inherited_totals, None)
            try:
                os.write(self.ready_fd, b"ready\n")
                os.close(self.ready_fd)
            except OSError:
                pass
            self.ready_fd = None
        self._prune_sockets()

    def inherited_totals(self, snap) -> None:
        """The old master's counters arrived (C{snap}), or will not (None): serve stats if waiting."""
        if snap is not None:
            self.stats_totals.inherited = snap
        waiting, self.stats_waiting = self.stats_waiting, None
        if waiting is not None:
            if waiting.active():
                waiting.cancel()
            self._serve_stats()

    def _hand_on_totals(self):
        """Send the new master (of an upgrade) every counter served here; a Deferred."""
        if self.heir is None:
            return defer.succeed(None)
        d = self.heir.callRemote(channel.InheritTotals, stats=json.dumps(self.stats_totals.counters()))
        return d.addErrback(lambda failure: log.warn("upgrade: cannot hand the counters on: {error}",
                                                     error=failure.getErrorMessage()))

    def worker_ended(self, worker: WorkerProcess, reason) -> None:
        if self.mutex_fd is not None:
            accept_mutex.clear_slot(self.mutex_fd, worker.slot)
        self.stats_totals.retire(worker.pid)
        if self.handed_over:
            self._hand_on_totals()
        if worker in self.retiring:
            self.retiring.discard(worker)
            self._prune_sockets()
        elif self.workers.get(worker.slot) is worker:
            del self.workers[worker.slot]
            self.exits[worker.slot] = {"pid": worker.pid, "reason": exit_reason(reason)}
            if not self.stopping and worker.state != "stopping" and worker.slot < self.worker_count:
                self._respawn_later(worker, reason)
        if self.stopping and not self.workers and not self.retiring:
            self._finish_stop()

    def _respawn_later(self, worker, reason) -> None:
        slot = worker.slot
        code = getattr(reason.value, "exitCode", None)
        sig = getattr(reason.value, "signal", None)
        # Young: it never served, or served briefly (its warm-up does not count).
        young = not worker.served or self.reactor.seconds() - worker.ready_at < YOUNG
        failures = self.failures.get(slot, 0) + 1 if young else 0
        self.failures[slot] = failures
        self.restarts[slot] = self.restarts.get(slot, 0) + 1
        delay = backoff_delay(failures)
        log.warn("worker {pid} (slot {slot}) exited (code {code}, signal {sig}); respawning in {delay}s",
                 pid=worker.pid, slot=slot, code=code, sig=sig, delay=delay)
        if delay:
            self.respawn_calls[slot] = self.reactor.callLater(delay, self._respawn, slot)
        else:
            self._respawn(slot)

    def _respawn(self, slot) -> None:
        self.respawn_calls.pop(slot, None)
        if not self.stopping and slot not in self.workers and slot < self.worker_count:
            # Connections queued on the crashed worker's socket wait for this one's warm-up.
            self._spawn(slot, replacing=True)

    def _all_workers(self) -> list:
        return list(self.workers.values()) + list(self.retiring)

    def live_workers(self) -> list:
        """The workers that answer commands: said hello, not gone."""
        return [w for w in self._all_workers() if w.hello and w.state != "gone"]

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
        old = self.config
        self.ejections.configure(config)
        rollover = _listen_layout(old) != _listen_layout(config) or any(
            getattr(old.global_, key) != getattr(config.global_, key) for key in _ROLLOVER_KEYS)
        if rollover:
            try:
                self._rollover(config, text)
            except OSError as e:
                return defer.succeed(self._refused("cannot listen: %s" % (e,)))
            applied = defer.succeed(None)
        else:
            self.config, self.config_text = config, text
            pushes = []
            for worker in self._all_workers():
                if worker.hello and worker.state in ("starting", "ready"):
                    d = worker.channel.callRemote(channel.Reconfigure, config=text, source=path)
                    pushes.append(d.addCallback(self._reconfigured, worker).addErrback(self._not_reconfigured, worker))
            self._resize(config.global_.worker_processes)
            applied = defer.DeferredList(pushes)

        if old.global_.stats_http != config.global_.stats_http:
            self._move_stats(config)

        def done(outcomes):
            failed = [error for _, error in outcomes or () if error]
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

    def _reconfigured(self, answer, worker):
        """A worker's answer to a pushed configuration: "" if applied, else what went wrong."""
        if not answer["ok"]:
            log.error("worker {pid} refused the configuration: {error}", pid=worker.pid, error=answer["error"])
            return "worker %s refused the configuration: %s" % (worker.pid, answer["error"])
        self.ejections.welcome(worker)  # its new pools start with every server in
        return ""

    def _not_reconfigured(self, failure, worker):
        """A push that got no answer: a failure unless a stop cut it short."""
        if worker.state in ("gone", "stopping") or self.stopping:
            return ""
        log.failure("worker {pid} could not apply the configuration", failure, pid=worker.pid)
        return "worker %s could not apply the configuration: %s" % (worker.pid, failure.getErrorMessage())

    def _record_reload(self, ok, error):
        self.last_reload = {"ok": ok, "error": error, "time": self.reactor.seconds() - self.started_at}

    def _rollover(self, config, text) -> None:
        """Start a new generation of workers on C{config}'s sockets; the old one drains once it is ready."""
        count = config.global_.worker_processes
        available = dict(self.sockets)
        new_sockets = self._open_sockets(config, count, available)
        self.sockets.update(new_sockets)
        self.config, self.config_text = config, text
        self.worker_count = count
        self._setup_mutex(config)
        for call in self.respawn_calls.values():
            call.cancel()
        self.respawn_calls = {}
        self.retiring.update(self.workers.values())
        self.workers = {}
        self.generation += 1
        self.rollover_pending = self.generation
        self.failures = {}
        for slot in range(count):
            self._spawn(slot)

    def set_workers(self, count: int):
        """Run C{count} workers from now on (until the next reload); returns (ok, error)."""
        if not 1 <= count <= accept_mutex.SLOTS:
            return False, "the worker count must be from 1 to %d" % (accept_mutex.SLOTS,)
        self._resize(count)
        return True, ""

    def _resize(self, count: int) -> None:
        if count == self.worker_count:
            return
        old = self.worker_count
        self.worker_count = count
        if count > old:
            self.sockets.update(self._open_sockets(self.config, count, dict(self.sockets)))
            for slot in range(old, count):
                if slot not in self.workers:
                    self._spawn(slot)
        else:
            for slot in range(count, old):
                call = self.respawn_calls.pop(slot, None)
                if call is not None:
                    call.cancel()
                worker = self.workers.pop(slot, None)
                if worker is not None:
                    self.retiring.add(worker)
                    worker.stop(graceful=True, timeout=self.config.global_.worker_shutdown_timeout)
            self._prune_sockets()
        for worker in self.live_workers():
            # Their shares of client_connections follow the new count.
            worker.channel.callRemote(channel.WorkerCount, count=count).addErrback(lambda _: None)
        log.info("worker count {old} -> {new}", old=old, new=count)

    # -- upgrade ------------------------------------------------------------------

    def start_upgrade(self):
        """SIGUSR2: start a new master from the current code on our sockets; returns (ok, error)."""
        if self.upgrade is not None or self.stopping:
            return False, "an upgrade or a stop is already under way"
        child_fds = {1: 1, 2: 2, 3: "r"}
        names = {}
        next_fd = 4
        for key, sock in list(self.sockets.items()) + list(self.stats_sockets.items()):
            child_fds[next_fd] = sock.fileno()
            names[key] = next_fd
            next_fd += 1
        heir_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds[next_fd] = child_end.fileno()
        env = dict(os.environ)
        env[INHERIT_ENV] = ";".join("%s=%d" % item for item in sorted(names.items()))
        env[READY_ENV] = "3"
        env[TOTALS_ENV] = str(next_fd)
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = package_root + os.pathsep + env.get("PYTHONPATH", "")
        # The operator's own command line, where it was started: pgrep -f, systemd
        # and init scripts find the new master as they found this one.
        argv = command.launch_argv()
        protocol = _UpgradeProtocol(self)
        self._move_pid_files(to_oldbin=True)
        try:
            self.reactor.spawnProcess(protocol, argv[0], argv, env=env, path=command.START_DIR, childFDs=child_fds)
        except Exception:
            self._move_pid_files(to_oldbin=False)
            raise
        finally:
            child_end.close()
        heir = amp.AMP()
        self.reactor.adoptStreamConnection(heir_end.fileno(), socket.AF_UNIX, quiet_factory(lambda: heir))
        heir_end.setblocking(False)  # PyPy's adoption made it blocking
        heir_end.close()
        protocol.heir = heir
        self.upgrade = protocol
        protocol.timeout = self.reactor.callLater(UPGRADE_TIMEOUT, self._upgrade_timed_out, protocol)
        log.info("upgrade: new master {pid} started", pid=protocol.transport.pid)
        return True, ""

    def upgrade_ready(self, protocol) -> None:
        if protocol.timeout.active():
            protocol.timeout.cancel()
        log.info("upgrade: new master {pid} serves; this master {me} drains and exits",
                 pid=protocol.transport.pid, me=os.getpid())
        self.handed_over = True
        self.heir = protocol.heir
        self.stop(graceful=True)
        # What the workers served up to now; more follows as each one exits.
        stats_workers.collect(self).addCallback(lambda _: self._hand_on_totals())

    def upgrade_failed(self, protocol, why) -> None:
        if protocol.timeout.active():
            protocol.timeout.cancel()
        if self.upgrade is protocol:
            self.upgrade = None
        if protocol.heir is not None and protocol.heir.transport is not None:
            protocol.heir.transport.loseConnection()
        # The new master may have taken the control path and the pid file: take them back,
        # before saying so (a supervisor that reads the log then the pid file finds this master).
        if self.control_port is not None:
            self.control_port.stopListening()
            self.control_port = None
            self._open_control()
        self._move_pid_files(to_oldbin=False)
        log.error("upgrade failed ({why}); this master keeps serving", why=str(why))

    def _move_pid_files(self, to_oldbin: bool) -> None:
        """
        Move this master's pid files (C{-p}, and twistd's C{--pidfile}) to
        C{PATH.oldbin} as an upgrade starts, so that the new master can write
        C{PATH} (twistd refuses to start over a live pid file), or back to
        C{PATH} when the upgrade failed.
        """
        from twistedproxy.tap import _twistd_options


        def move(path):
            base = path[:-len(command.OLDBIN)] if path.endswith(command.OLDBIN) else path
            new = base + command.OLDBIN if to_oldbin else base
            if new != path:
                try:
                    os.replace(path, new)
                except OSError as e:
                    log.warn("pid file {path}: {error}", path=path, error=str(e))
            return new

        if self.pid_file:
            self.pid_file = move(self.pid_file)
        twistd = _twistd_options(self.options)
        if twistd is not None and twistd.get("pidfile"):
            twistd["pidfile"] = move(twistd["pidfile"])  # what twistd removes when this master leaves

    def _upgrade_timed_out(self, protocol) -> None:
        log.error("upgrade: new master not ready after {t}s; stopping it", t=UPGRADE_TIMEOUT)
        try:
            protocol.transport.signalProcess("TERM")
        except Exception:
            pass

    # -- logs -------------------------------------------------------------------

    def reopen_logs(self) -> None:
        logs.reopen()
        for worker in self._all_workers():
            worker.signal("USR1")
        log.info("log files reopened")

    def set_log_level(self, level: LogLevel) -> None:
        logs.set_level(level)
        for worker in self._all_workers():
            if worker.hello and worker.state != "gone":
                worker.channel.callRemote(channel.SetLogLevel, level=level.name).addErrback(lambda _: None)

    def step_log_level(self, step: int) -> None:
        """SIGTTIN (+1, more verbose) / SIGTTOU (-1)."""
        level = logs.stepped_level(step)
        self.set_log_level(level)
        log.info("log level is now {name}", name=level.name)

    # -- status and stats ----------------------------------------------------------

    def status(self) -> dict:
        now = self.reactor.seconds()
        return {
            "pid": os.getpid(),
            "uptime": round(now - self.started_at, 3),
            "config": self.config_path,
            "config_digest": hashlib.sha256(self.config_text.encode("utf-8")).hexdigest(),
            "generation": self.generation,
            "worker_processes": self.worker_count,
            "listen_mode": self.config.global_.listen_mode,
            "accept_mutex": self.use_mutex,
            "workers": [w.describe() for _, w in sorted(self.workers.items())],
            "restarts": {str(slot): n for slot, n in sorted(self.restarts.items())},
            "retiring": [w.describe() for w in self.retiring],
            "last_reload": self.last_reload,
            "log_level": logs.current_level().name,
            "upgrading": self.upgrade is not None,
            "stopping": self.stopping,
        }

    def collect_stats(self):
        """A Deferred firing with {pid: the worker's stats} over every live worker."""
        d = stats_workers.collect(self)
        return d.addCallback(lambda answers: {str(w.pid): snap for w, snap in answers.items()})

    # -- stop -------------------------------------------------------------------

    def stop(self, graceful: bool = True) -> None:
        """Stop every worker (C{graceful}: let them finish in-flight requests), then exit."""
        if self.stopping:
            if not graceful:
                for worker in self._all_workers():
                    worker.stop(graceful=False, timeout=0)
            return
        self.stopping = True
        self.ejections.stop()
        log.info("master {pid}: {how} stop", pid=os.getpid(), how="graceful" if graceful else "fast")
        for call in self.respawn_calls.values():
            call.cancel()
        self.respawn_calls = {}
        if self.handed_over:
            # The new master serves the control path and the stats endpoints now.
            if self.control_port is not None:
                self.control_port.stopListening()
                self.control_port = None
            for port in self.stats_ports:
                port.stopListening()
            self.stats_ports = []
        timeout = self.config.global_.worker_shutdown_timeout
        for worker in self._all_workers():
            worker.stop(graceful=graceful, timeout=timeout)
        if not self.workers and not self.retiring:
            self._finish_stop()

    def _finish_stop(self) -> None:
        if self.stats_loop is not None and self.stats_loop.running:
            self.stats_loop.stop()
        for port in self.stats_ports:
            port.stopListening()
        self.stats_ports = []
        for sock in list(self.sockets.values()) + list(self.stats_sockets.values()):
            self._close_socket(sock)
        self.sockets = {}
        self.stats_sockets = {}
        if self.mutex_fd is not None:
            os.close(self.mutex_fd)
            self.mutex_fd = None
        if self.control_port is not None:
            port, self.control_port = self.control_port, None
            port.stopListening()
            if not self.handed_over:
                try:
                    os.unlink(self.config.global_.control)
                except OSError:
                    pass
        # The new master of an upgrade gets the final counters before we go (a
        # new master that does not answer cannot keep us here).
        self._hand_on_totals().addTimeout(HAND_ON_TIMEOUT, self.reactor).addBoth(lambda _: self._stopped())

    def _stopped(self) -> None:
        if self.pid_file:
            command.remove_pid_file(self.pid_file)
        if self.heir is not None:
            self.heir.transport.loseConnection()
            self.heir = None
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
