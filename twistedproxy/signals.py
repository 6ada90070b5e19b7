"""
Unix signals handled in the reactor thread: a handler only queues its action
with C{callFromThread}, so the action runs between I/O events like any other
callback (never inside a half-finished one).
"""

from __future__ import annotations

import signal


def install(reactor, handlers: dict) -> None:
    """
    Run C{handlers[signum]()} in the reactor whenever C{signum} arrives.  A
    Python handler already installed (twistd's SIGUSR1 log rotation, say) still
    runs first.
    """
    for signum, handler in handlers.items():
        previous = signal.getsignal(signum)
        if not callable(previous):
            previous = None

        def on_signal(number, frame, action=handler, previous=previous):
            if previous is not None:
                previous(number, frame)
            reactor.callFromThread(action)

        signal.signal(signum, on_signal)
