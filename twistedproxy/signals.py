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
    Log C{signum} and run C{action()} in the reactor whenever it arrives, for
    C{handlers[signum] = (doing, action)}; C{action} may be None (only the
    line is logged).  A Python handler already installed (twistd's SIGUSR1 log
    rotation, the reactor's SIGTERM) still runs first.  At once, so that a
    signal sent as soon as the proxy listens is not lost; SIGINT and SIGTERM
    once the reactor runs, since it installs its own for them as it starts
    (an action of None leaves the stop to it, or stops the reactor if it
    installed none: the process started with the signal ignored).
    """

    def install_now(signums):
        for signum in signums:
            doing, action = handlers[signum]
            previous = signal.getsignal(signum)
            if not callable(previous):
                previous = None
                if action is None and signum in reactors_own:
                    # The reactor installed no handler of its own: Python leaves a
                    # signal ignored when the process started with it ignored (a
                    # shell starts a background job with SIGINT ignored), and
                    # Twisted then leaves it alone.  nutcracker exits anyway.
                    action = reactor.stop

            def run(signum=signum, doing=doing, action=action):
                log.info(received(signum, doing))
                if action is not None:
                    action()

            def on_signal(number, frame, run=run, previous=previous):
                if previous is not None:
                    previous(number, frame)
                reactor.callFromThread(run)

            signal.signal(signum, on_signal)

    reactors_own = [signum for signum in handlers if signum in (signal.SIGINT, signal.SIGTERM)]
    install_now([signum for signum in handlers if signum not in reactors_own])
    reactor.callWhenRunning(install_now, reactors_own)
