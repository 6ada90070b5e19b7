"""
Run the proxy (C{cacheproxy}'s arguments) with timestamps around every reactor
iteration and the runtime's own events, to find where a pause comes from.

    PYTHONPATH=. .venv-pypy/bin/python bench/pauses.py -c conf.yml [-s PORT ...]

At exit (SIGINT/SIGTERM) it writes to C{$PAUSES_OUT} (default
C{pauses.txt}), all times in C{time.monotonic()} seconds (CLOCK_MONOTONIC, the
clock a load generator can stamp its slow requests with):

  - C{iters N busy S}: reactor iterations and the seconds spent handling
    events and timers (everything but the wait in epoll);
  - C{LONG t ms nev=k cpu=c}: an iteration that took longer than C{$PAUSES_MS}
    (default 0.7) after its poll returned C{k} events at C{t}, C{c} ms of it
    the process's own CPU time (far less than the wall time: it was descheduled);
  - C{EV t minor n seconds heap_bytes}, C{EV t step n seconds old new} and
    C{EV t major ...}: PyPy's GC hooks (minor collections, incremental
    major-collection steps with the GC states they moved between: 0 scanning,
    1 marking, 2 sweeping, 3 finalizing; completed major collections);
  - C{EV t jit loop|bridge|entry-bridge N}: PyPy compiled a loop or a bridge
    (with C{TP_JIT_LOG=FILE} and C{bench/jithook} first on C{PYTHONPATH}, that
    hook logs each one to FILE instead, with where its trace starts, the
    functions it runs through and, for a bridge, the guard that failed; the
    same clock);
    C{EV t jitabort key reason}: it gave up tracing;
  - with C{PAUSES_SECTIONS=1} on PyPy, each reactor iteration (from a poll's
    return to the next poll) is also a C{tp-iter} section of PyPy's own log,
    its first line the poll's events and the C{time.monotonic()} it returned
    at: run with C{PYPYLOG=jit-tracing,jit-backend,jit-abort,jit-blackhole,
    gc-minor,gc-collect-step,tp-iter:FILE} and C{bench/iterlog.py FILE} lists
    the long iterations with the time each section of the JIT and the GC took
    inside them (tracing, compiling, collecting, or none: interpreted code).
    PyPy takes C{PYPYLOG} out of C{os.environ}, hence a variable of its own;
    set C{PYPY_GC_NURSERY} and C{PYPY_GC_INCREMENT_STEP} too, or the proxy
    runs itself again with them (L{twistedproxy.process.nursery}) and the first
    process's log is cut off;
  - C{EV t cpy-start|cpy-stop generation ...}: CPython's cyclic collections;
  - C{PROBE k cpu_ms wall_ms old new}: on PyPy, each SIGWINCH runs one whole
    major collection (the one in progress first) step by step with
    C{gc.collect_step()} in a reactor iteration of its own, and records each
    step's thread CPU time and wall time: how long the steps the collector
    would take under load are, measured when nothing else competes (the CPU
    time is what the other processes on the machine cannot stretch).

The hooks cost some time themselves: compare runs made the same way.  See
README.md, "Where the pauses came from", for what they showed.
"""

from __future__ import annotations

import gc
import os
import sys
import time

import twistedproxy.reactor

twistedproxy.reactor.install()  # the reactor the proxy serves on
from twisted.internet import reactor  # noqa: E402

mono = time.monotonic
OUT = os.environ.get("PAUSES_OUT", "pauses.txt")
THRESHOLD = float(os.environ.get("PAUSES_MS", "0.7")) / 1000.0
events = []
long_iterations = []
state = {"returned": None, "cpu_returned": 0.0, "events": 0, "iterations": 0, "busy": 0.0}


try:
    from __pypy__ import debug_print, debug_start, debug_stop
except ImportError:
    SECTIONS = False
else:
    SECTIONS = os.environ.get("PAUSES_SECTIONS") == "1"
    if SECTIONS:
        debug_start("tp-iter")  # what runs before the first poll


class TimedPoller:
    """The reactor's epoll object, with the time between two polls recorded."""

    def __init__(self, poller):
        self.poller = poller

    def __getattr__(self, name):
        return getattr(self.poller, name)

    def poll(self, timeout=-1, maxevents=-1):
        if SECTIONS:
            debug_stop("tp-iter")
        start = mono()
        cpu_start = time.thread_time()
        returned = state["returned"]
        if returned is not None:
            busy = start - returned
            state["busy"] += busy
            state["iterations"] += 1
            if busy > THRESHOLD:
                long_iterations.append((returned, busy, state["events"], cpu_start - state["cpu_returned"]))
        result = self.poller.poll(timeout, maxevents)
        state["returned"] = mono()
        state["cpu_returned"] = time.thread_time()
        state["events"] = len(result)
        if SECTIONS:
            debug_start("tp-iter")
            debug_print(len(result), state["returned"])
        return result


reactor._poller = TimedPoller(reactor._poller)

if hasattr(gc, "hooks"):  # PyPy
    def on_minor(stats):
        events.append((mono(), "minor", stats.count, stats.duration, stats.total_memory_used))

    def on_step(stats):
        events.append((mono(), "step", stats.count, stats.duration, stats.oldstate, stats.newstate))

    def on_collect(stats):
        events.append((mono(), "major", stats.count, stats.num_major_collects, stats.arenas_count_before,
                       stats.arenas_count_after, stats.rawmalloc_bytes_before, stats.rawmalloc_bytes_after))

    gc.hooks.on_gc_minor = on_minor
    gc.hooks.on_gc_collect_step = on_step
    gc.hooks.on_gc_collect = on_collect
else:
    def on_cpython_gc(phase, info):
        events.append((mono(), "cpy-" + phase, info.get("generation"), info.get("collected", 0)))

    gc.callbacks.append(on_cpython_gc)

try:
    import pypyjit
except ImportError:
    pass
else:
    def on_compile(info):
        events.append((mono(), "jit", info.type.replace(" ", "-"), getattr(info, "loop_no", "?")))

    def on_abort(driver, greenkey, reason, operations=None):
        events.append((mono(), "jitabort", repr(greenkey)[:160].replace(" ", "_"), reason))

    if not os.environ.get("TP_JIT_LOG"):  # else bench/jithook's hook logs each compilation, and where
        pypyjit.set_compile_hook(on_compile, operations=False)
    pypyjit.set_abort_hook(on_abort)


probes = []


def probe():
    """One whole major collection, step by step (see C{PROBE} above)."""
    k = len({p[0] for p in probes})
    while not gc.collect_step().major_is_done:  # finish the collection in progress, unrecorded
        pass
    done = False
    while not done:
        cpu, wall = time.thread_time(), mono()
        stats = gc.collect_step()
        probes.append((k, (time.thread_time() - cpu) * 1000.0, (mono() - wall) * 1000.0,
                       stats.oldstate, stats.newstate))
        done = stats.major_is_done


if hasattr(gc, "collect_step"):
    import signal

    signal.signal(signal.SIGWINCH, lambda *a: reactor.callFromThread(probe))


def dump():
    with open(OUT, "w") as f:
        f.write("iters %d busy %.3f\n" % (state["iterations"], state["busy"]))
        for returned, busy, nev, cpu in long_iterations:
            f.write("LONG %.6f %.3fms nev=%d cpu=%.3f\n" % (returned, busy * 1000.0, nev, cpu * 1000.0))
        for event in events:
            f.write("EV %.6f %s\n" % (event[0], " ".join(str(x) for x in event[1:])))
        for p in probes:
            f.write("PROBE %d %.3f %.3f %d %d\n" % p)


reactor.addSystemEventTrigger("after", "shutdown", dump)

if __name__ == "__main__":
    from twistedproxy.cli import main

    sys.exit(main())
