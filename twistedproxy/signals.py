"""
Unix signals handled in the reactor thread: a handler only queues its action
with C{callFromThread}, so the action runs between I/O events like any other
callback (never inside a half-finished one).  Each signal is logged as
nutcracker logs it (C{signal 1 (SIGHUP) received, reopening log file}); the
action then logs what it did.
"""

from __future__ import annotations

import signal

from twisted.logger import Logger

log = Logger()


def received(signum: int, doing: str = "") -> str:
    """nutcracker's line for a signal: C{signal 12 (SIGUSR2) received}, plus C{, doing} when given."""
    return "signal %d (%s) received%s" % (signum, signal.Signals(signum).name, ", " + doing if doing else "")


def install(reactor, handlers: dict) -> None:
    """
    Once the reactor runs (it installs its own SIGINT/SIGTERM handlers as it
    starts), log C{signum} and run C{action()} in the reactor whenever it
    arrives, for C{handlers[signum] = (doing, action)}; C{action} may be None
    (only the line is logged).  A Python handler already installed (twistd's
    SIGUSR1 log rotation, the reactor's SIGTERM) still runs first.
    """

    def install_now():
        for signum, (doing, action) in handlers.items():
            previous = signal.getsignal(signum)
            if not callable(previous):
                previous = None

            def run(signum=signum, doing=doing, action=action):
                log.info(received(signum, doing))
                if action is not None:
                    action()

            def on_signal(number, frame, run=run, previous=previous):
                if previous is not None:
                    previous(number, frame)
                reactor.callFromThread(run)

            signal.signal(signum, on_signal)

    reactor.callWhenRunning(install_now)
