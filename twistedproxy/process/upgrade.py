"""
Binary upgrade (SIGUSR2), as nginx does it, both sides of it.

The old master starts a new one from the current code with the operator's own
command line, passing every listening socket (pools and stats endpoints) as a
descriptor, a pipe on which the new master says it serves, and a socket on
which it then sends the new master its counters (they must not go backwards)
and hands on the clients of its draining workers.  The pid file (C{-p}) moves
to C{PIDFILE.oldbin} (removed when the old master leaves, moved back if the
upgrade fails), and the new master writes C{PIDFILE}.

C{master} (L{twistedproxy.process.master.MasterService}) gives this room its
sockets, its statistics, C{stop()} and its control endpoint.
"""

from __future__ import annotations

import json
import os
import socket

from twisted.internet import defer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.protocols import amp

from twistedproxy.net.channels import quiet_factory
from twistedproxy.process import channel, command, handoff
from twistedproxy.process.listeners import INHERIT_ENV
from twistedproxy.stats.histogram import with_encoded

log = Logger()

# The pipe on which an upgraded master tells the old one it serves (fd number in env).
READY_ENV = "TWISTEDPROXY_UPGRADE_READY_FD"
# The socket on which the old master sends the new one its counters (fd number in env).
TOTALS_ENV = "TWISTEDPROXY_UPGRADE_TOTALS_FD"
HAND_ON_TIMEOUT = 5.0  # seconds an old master waits for the new one to take its last counters
UPGRADE_TIMEOUT = 30.0  # seconds the old master waits for the new one


def _take_fd(name: str):
    """The descriptor number an upgrading master left in environment variable C{name} (removed), or None."""
    value = os.environ.pop(name, None)
    return int(value) if value and value.isdigit() else None


class _NewMaster(ProcessProtocol):
    """The new master of an upgrade, seen from the old one."""

    def __init__(self, upgrade):
        self.upgrade = upgrade
        self.ready = False
        self.buffer = b""
        self.heir = None  # AMP to the new master (counters are sent on it once it serves)
        self.timeout = None

    def childDataReceived(self, fd, data):
        self.buffer += data
        if not self.ready and b"ready" in self.buffer:
            self.ready = True
            self.upgrade.new_master_ready(self)

    def processEnded(self, reason):
        if not self.ready:
            self.upgrade.new_master_failed(self, reason.value)


class _Inheritance(amp.AMP):
    """A new master's end of the channel on which the old master sends its counters."""

    def __init__(self, master):
        amp.AMP.__init__(self)
        self.master = master

    @channel.InheritTotals.responder
    def inherit(self, stats):
        self.master.stats.inherit(json.loads(stats))
        return {}

    @handoff.HandOff.responder
    def hand_off(self, fd, family, listen, pool, state):
        # A client of the old master's draining workers: to one of ours.
        return handoff.relay(self.master, None, fd, family, listen, pool, state)

    def connectionLost(self, reason):
        amp.AMP.connectionLost(self, reason)
        self.master.stats.inherit(None)  # the old master is gone: serve with what came


class Upgrade:
    """
    One master's part in upgrades: as the old master (L{start}), and as the
    new master of an upgrade (L{take_environment}, L{serving}).

    @ivar starting: the new master being started, or None.
    @ivar heir: the AMP channel to the new master once it serves (the
        counters and handed-over clients go there), or None.
    """

    def __init__(self, master, reactor):
        self.master = master
        self.reactor = reactor
        self.starting = None
        self.heir = None
        self.ready_fd = None  # we are the new master: where we say we serve
        self.totals_fd = None  # we are the new master: where the old master's counters arrive

    # -- as the new master ----------------------------------------------------------

    def take_environment(self) -> None:
        """Read (and remove) what an old master left in the environment for us."""
        self.ready_fd = _take_fd(READY_ENV)
        self.totals_fd = _take_fd(TOTALS_ENV)

    @property
    def inheriting(self) -> bool:
        """We are the new master of an upgrade, not serving yet: the old master answers the stats till then."""
        return self.ready_fd is not None

    def listen_to_old_master(self) -> None:
        if self.totals_fd is not None:
            inheritance = _Inheritance(self.master)
            self.reactor.adoptStreamConnection(self.totals_fd, socket.AF_UNIX, quiet_factory(lambda: inheritance))
            os.close(self.totals_fd)  # the reactor holds its own duplicate
            self.totals_fd = None

    def serving(self) -> None:
        """Our workers serve: tell the old master it can leave; the stats follow its counters."""
        if self.ready_fd is None:
            return
        self.master.stats.wait_for_inheritance()
        try:
            os.write(self.ready_fd, b"ready\n")
            os.close(self.ready_fd)
        except OSError:
            pass
        self.ready_fd = None

    # -- as the old master ------------------------------------------------------------

    def start(self, sockets: dict):
        """Start a new master from the current code on C{sockets} (name -> socket); returns (ok, error)."""
        if self.starting is not None or self.master.stopping:
            return False, "an upgrade or a stop is already under way"
        child_fds = {1: 1, 2: 2, 3: "r"}
        names = {}
        next_fd = 4
        for key, sock in sockets.items():
            child_fds[next_fd] = sock.fileno()
            names[key] = next_fd
            next_fd += 1
        heir_end, child_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        child_fds[next_fd] = child_end.fileno()
        env = dict(os.environ)
        env[INHERIT_ENV] = ";".join("%s=%d" % item for item in sorted(names.items()))
        env[READY_ENV] = "3"
        env[TOTALS_ENV] = str(next_fd)
        env["PYTHONPATH"] = command.package_root() + os.pathsep + env.get("PYTHONPATH", "")
        # The operator's own command line, where it was started: pgrep -f, systemd
        # and init scripts find the new master as they found this one.
        argv = command.launch_argv()
        protocol = _NewMaster(self)
        self.move_pid_files(to_oldbin=True)
        try:
            self.reactor.spawnProcess(protocol, argv[0], argv, env=env, path=command.START_DIR, childFDs=child_fds)
        except Exception:
            self.move_pid_files(to_oldbin=False)
            raise
        finally:
            child_end.close()
        heir = amp.AMP()
        self.reactor.adoptStreamConnection(heir_end.fileno(), socket.AF_UNIX, quiet_factory(lambda: heir))
        heir_end.setblocking(False)  # PyPy's adoption made it blocking
        heir_end.close()
        protocol.heir = heir
        self.starting = protocol
        protocol.timeout = self.reactor.callLater(UPGRADE_TIMEOUT, self._timed_out, protocol)
        log.info("upgrade: new master {pid} started", pid=protocol.transport.pid)
        return True, ""

    def new_master_ready(self, protocol) -> None:
        if protocol.timeout.active():
            protocol.timeout.cancel()
        log.info("upgrade: new master {pid} serves; this master {me} drains and exits",
                 pid=protocol.transport.pid, me=os.getpid())
        self.heir = protocol.heir
        master = self.master
        master.taken_over()
        master.stop(graceful=True)
        # What the workers served up to now; more follows as each one exits.
        master.stats.collect().addCallback(lambda _: self.hand_on_totals())

    def new_master_failed(self, protocol, why) -> None:
        if protocol.timeout.active():
            protocol.timeout.cancel()
        if self.starting is protocol:
            self.starting = None
        if protocol.heir is not None and protocol.heir.transport is not None:
            protocol.heir.transport.loseConnection()
        # The new master may have taken the control path and the pid file: take them back,
        # before saying so (a supervisor that reads the log then the pid file finds this master).
        self.master.reopen_control()
        self.move_pid_files(to_oldbin=False)
        log.error("upgrade failed ({why}); this master keeps serving", why=str(why))

    def _timed_out(self, protocol) -> None:
        log.error("upgrade: new master not ready after {t}s; stopping it", t=UPGRADE_TIMEOUT)
        try:
            protocol.transport.signalProcess("TERM")
        except Exception:
            pass

    def move_pid_files(self, to_oldbin: bool) -> None:
        """
        Move this master's pid files (C{-p}, and twistd's C{--pidfile}) to
        C{PATH.oldbin} as an upgrade starts, so that the new master can write
        C{PATH} (twistd refuses to start over a live pid file), or back to
        C{PATH} when the upgrade failed.
        """

        def move(path):
            base = path[:-len(command.OLDBIN)] if path.endswith(command.OLDBIN) else path
            new = base + command.OLDBIN if to_oldbin else base
            if new != path:
                try:
                    os.replace(path, new)
                except OSError as e:
                    log.warn("pid file {path}: {error}", path=path, error=str(e))
            return new

        master = self.master
        if master.pid_file:
            master.pid_file = move(master.pid_file)
        twistd = command.twistd_options(master.options)
        if twistd is not None and twistd.get("pidfile"):
            twistd["pidfile"] = move(twistd["pidfile"])  # what twistd removes when this master leaves

    def hand_on_totals(self):
        """Send the new master every counter served here; a Deferred (fired at once when there is none)."""
        if self.heir is None:
            return defer.succeed(None)
        d = self.heir.callRemote(channel.InheritTotals, stats=json.dumps(with_encoded(self.master.stats.totals.counters())))
        return d.addErrback(lambda failure: log.warn("upgrade: cannot hand the counters on: {error}",
                                                     error=failure.getErrorMessage()))

    def last_hand_on(self):
        """Stopping: the new master gets the final counters (one that does not answer cannot keep us); a Deferred."""
        return self.hand_on_totals().addTimeout(HAND_ON_TIMEOUT, self.reactor)

    def close(self) -> None:
        if self.heir is not None:
            self.heir.transport.loseConnection()
            self.heir = None
