"""
The reactor that the C{cacheproxy} command, twistd's C{cacheproxy} plugin and
the worker processes run on: Twisted's epoll reactor without its per-event log
context bookkeeping.

Twisted's epoll reactor calls every ready descriptor through
C{log.callWithLogger}: for each event it asks the descriptor for its log
prefix, copies the log context dict, pushes the copy on a per-thread context
stack and pops it afterwards, only so that a legacy C{twisted.python.log}
message logged meanwhile (an unhandled exception in C{dataReceived}, a failed
C{accept}) names that descriptor as its "system".  Issue #10 measured that at
about 12% of the proxy's CPU per request unpipelined (bench/README.md has the
figures before and after).

L{EPollReactor} dispatches each event through Twisted's own
C{_doReadOrWrite}, so read errors, disconnections, half-close, writes,
producers and an exception in C{dataReceived} (logged, connection dropped) are
Twisted's.  It only replaces the bookkeeping: it notes which descriptor it is
serving, and while it is the installed reactor the default log context
computes "system" from that descriptor when, and only when, something is
logged.  Log lines read as they do under Twisted's reactor.  An event that
is only "readable" goes straight to C{doRead} (with C{_doReadOrWrite}'s
error handling), and its main loop does Twisted's per-turn bookkeeping only
when a turn has some (L{EPollReactor.mainLoop} says why).  It also offers
C{callAfterEvents(f)}: what C{callLater(0, f)} does from an event handler (run
once the poll's events are handled, before the next wait) without a timer,
which the core's turn flusher uses (L{twistedproxy.core.batching}).  And its
timed calls keep their attributes when cancelled (L{_DelayedCall}), so that
on PyPy a cancelled call waiting in the timer heap looks like any other to
the compiled reactor loop.

C{TWISTEDPROXY_REACTOR=twisted} in the environment keeps Twisted's default
reactor instead (to compare); workers inherit the choice from the master.
Programs that embed the proxy keep whatever reactor they installed.
"""

from __future__ import annotations

import errno
import os
import sys

from twisted.internet import error
from twisted.internet.base import DelayedCall
from twisted.logger import Logger, LogLevel
from twisted.python import context, log, reflect, threadable

try:
    from select import EPOLLIN as _READABLE

    from twisted.internet import epollreactor
except ImportError:  # no epoll (not Linux): Twisted's default reactor only
    epollreactor = None

# The environment variable that chooses the reactor: "fast" (the default) or "twisted".
REACTOR_ENV = "TWISTEDPROXY_REACTOR"
# Twisted's longest wait (ReactorBase.timeout): 2 ** 31 milliseconds, as epoll_wait takes it.
_LONGEST_WAIT = 2147483
CHOICES = ("fast", "twisted")
_log = Logger()


class _DelayedCall(DelayedCall):
    """
    Twisted's timed call, whose C{cancel} sets C{func}, C{args} and C{kw} to
    None instead of deleting them.

    Why: PyPy gives an object a hidden class (a map) made of the attributes it
    has, and the reactor loop's compiled code checks the map of the first call
    in the timer heap on every iteration.  A cancelled call stays in the heap
    until it is due (Twisted removes cancelled calls lazily), and with its
    attributes deleted it has another map: while one is first in the heap,
    every iteration leaves the compiled loop, until PyPy compiles a bridge for
    it, milliseconds of a reactor turn.  The warm-up's own connections leave
    such calls behind (their connect timeouts, their backends' timers), so
    this came in the first second of serving (bench/README.md, "Measured in
    the ninth #10 session").  Nothing else changes: a cancelled call drops its references
    as Twisted's does and reads the same.
    """

    __slots__ = ()

    def cancel(self) -> None:
        if self.cancelled:
            raise error.AlreadyCancelled
        elif self.called:
            raise error.AlreadyCalled
        self.canceller(self)
        self.cancelled = 1
        if self.debug:
            self._repr = repr(self)
        self.func = self.args = self.kw = None

    def __repr__(self) -> str:
        if self.cancelled and self._repr is None:  # what Twisted's shows once func is deleted
            return "<DelayedCall 0x%x [%ss] called=%s cancelled=%s>" % (
                id(self), self.time - self.seconds(), self.called, self.cancelled)
        return DelayedCall.__repr__(self)


if epollreactor is not None:

    class EPollReactor(epollreactor.EPollReactor):
        """Twisted's epoll reactor, dispatching events without pushing a log context per event."""

        def __init__(self):
            super().__init__()
            # The descriptor whose event is being handled, for the log's "system" (L{_ServedSystem}).
            self.serving = None
            self._after_events = []

        def callAfterEvents(self, f) -> None:
            """
            Call C{f()} once every event of the current poll is handled, before
            the reactor waits again (outside event handling: C{callLater(0)}).
            What C{callLater(0)} does from an event handler, without a timer.
            """
            if self.serving is None:
                self.callLater(0, f)
            else:
                self._after_events.append(f)

        def doPoll(self, timeout):
            """Wait up to C{timeout} seconds (None: for ever) for events and handle them."""
            if timeout is None:
                timeout = -1
            try:
                events = self._poller.poll(timeout, len(self._selectables))
            except OSError as e:
                if e.errno == errno.EINTR:
                    return
                raise
            selectables = self._selectables
            dispatch = self._doReadOrWrite
            for fd, event in events:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue  # removed while an earlier event of this batch was handled
                self.serving = selectable
                try:
                    if event == _READABLE and selectable.fileno() != -1:
                        self._read(selectable)
                    else:
                        dispatch(selectable, fd, event)
                except KeyboardInterrupt:
                    self.serving = None
                    raise
                except BaseException:
                    # What callWithLogger does with an error that escaped
                    # _doReadOrWrite (one from connectionLost, say): log it
                    # under the descriptor's prefix and go on with the others.
                    log.err()
            self.serving = None
            if self._after_events:
                calls, self._after_events = self._after_events, []
                for f in calls:
                    try:
                        f()
                    except Exception:
                        _log.failure("while calling {f} after the poll's events", f=f)

        doIteration = doPoll

        def _read(self, selectable) -> None:
            """
            What Twisted's C{_doReadOrWrite} does with an event that is only
            "readable" (nearly every event the proxy sees), without its checks
            for the other kinds: C{doRead}, and an error it raises or a reason
            it returns disconnects the descriptor.
            """
            try:
                why = selectable.doRead()
            except BaseException:
                why = sys.exc_info()[1]
                log.err()
            if why:
                self._disconnectSelectable(selectable, why, True)

        def mainLoop(self) -> None:
            """
            Twisted's main loop, with the same steps per turn (due timed calls
            and calls from threads, then a wait no longer than the next timed
            call), and Twisted's bookkeeping for them only when there is some
            to do.

            Why: at one request per turn, Twisted's turn (a context manager
            entered and left, C{runUntilCurrent} and C{timeout}, each reading
            the clock and checking the queues) was a few microseconds of
            CPython's time, and the proxy turns once or twice a request.  Here
            a turn reads the clock once; when no timed call is due, no thread
            called in, none was scheduled, none is left to purge and the
            reactor is not stopping, C{runUntilCurrent} would do nothing, so it
            is not called.  An error escaping a turn is logged as Twisted's loop
            logs it, and the loop goes on.
            """
            while self._started:
                try:
                    self._turns()
                except BaseException:
                    _log.failure("Unexpected error in main loop", level=LogLevel.critical)
            _log.info("Main loop terminated.")

        def _turns(self) -> None:
            seconds = self.seconds
            poll = self.doIteration
            while self._started:
                pending = self._pendingTimedCalls
                now = seconds()
                if (
                    self.threadCallQueue
                    or self._newTimedCalls
                    or self._justStopped
                    or (pending and pending[0].time <= now)
                    or (self._cancellations > 50 and self._cancellations > len(pending) >> 1)
                ):
                    self.runUntilCurrent()
                    timeout = self.timeout()
                elif pending:
                    # The first timed call is not due yet: what Twisted's timeout() gives.
                    timeout = min(_LONGEST_WAIT, pending[0].time - now)
                else:
                    timeout = None
                poll(self.running and timeout)

        def callLater(self, delay, callable, *args, **kw):
            """Twisted's C{callLater}, with a L{_DelayedCall}."""
            assert delay >= 0, f"{delay} is not greater than or equal to 0 seconds"
            call = _DelayedCall(self.seconds() + delay, callable, args, kw,
                                self._cancelCallLater, self._moveCallLaterSooner, seconds=self.seconds)
            self._newTimedCalls.append(call)
            return call

else:  # pragma: no cover (Linux has epoll)
    EPollReactor = None


class _ServedSystem(dict):
    """
    The default log context while an L{EPollReactor} is installed: its
    "system" is the log prefix of the descriptor the reactor is serving (in
    the reactor's thread), as log.callWithLogger would have set it, else "-".
    """

    def __init__(self, reactor, default):
        super().__init__(default)
        self._reactor = reactor

    def _system(self):
        selectable = self._reactor.serving
        if selectable is None or not threadable.isInIOThread():
            return None
        try:
            return selectable.logPrefix()
        except Exception:
            return "(buggy logPrefix method)"  # callWithLogger's words

    def copy(self):
        copied = dict(self)
        system = self._system()
        if system is not None:
            copied["system"] = system
        return copied

    def __getitem__(self, key):
        if key == "system":
            system = self._system()
            if system is not None:
                return system
        return super().__getitem__(key)

    def get(self, key, default=None):
        try:
            return self[key]
        except KeyError:
            return default


def install(environ=None):
    """
    Install the reactor that C{TWISTEDPROXY_REACTOR} in C{environ} (default
    C{os.environ}) chooses, L{EPollReactor} unless it says "twisted", and
    return the installed reactor.  If a reactor is installed already (twistd
    -r, a program that embeds the proxy) it stays and is returned.  Raises
    ValueError for an unknown choice.
    """
    environ = os.environ if environ is None else environ
    choice = environ.get(REACTOR_ENV) or "fast"
    if choice not in CHOICES:
        raise ValueError("%s=%s: expected one of %s" % (REACTOR_ENV, choice, ", ".join(CHOICES)))
    if "twisted.internet.reactor" not in sys.modules and choice == "fast" and EPollReactor is not None:
        from twisted.internet.main import installReactor

        reactor = EPollReactor()
        installReactor(reactor)
        context.setDefault(log.ILogContext, _ServedSystem(reactor, context.get(log.ILogContext) or {"system": "-"}))
    from twisted.internet import reactor

    _log.debug("reactor: {name}", name=reflect.qual(type(reactor)))
    return reactor
