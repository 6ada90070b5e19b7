"""
PyPy's major-collection steps under open-loop load, A/B: one proxy process per
variant (its environment settings), run under bench/pauses.py's hooks, the
variants interleaved turn by turn.

    python3 bench/gcsteps.py --protocol redis --rates 20000,5000 --turns 2 \\
        --variant before:PYPY_GC_INCREMENT_STEP=32MB --variant after:

A variant is C{NAME:VAR=VALUE,VAR=VALUE...}: environment settings of the
proxy (none: the proxy as it is; C{GCSTEPS_COLLECT=1}: a full collection
between the warm-up and the load).  Per turn and variant: a fresh proxy (PyPy,
one process, under bench/pauses.py) in front of one preloaded backend,
C{--warmup} requests closed-loop, then per rate C{--rounds} rounds of
C{--seconds} open-loop (bench/latgen.c, as bench/latency.py), then C{--probes}
whole major collections stepped by hand with no load (pauses.py's SIGWINCH).

Printed per rate: the latency (p50, p99, p99.9, max, microseconds); from the
GC hooks over the measured window, minor collections, completed major
collections, major-collection steps by the state they started in (count,
longest and total wall milliseconds), the heap (C{total_memory_used} at the
last minor collection, MB), reactor iterations over 1 ms, JIT compilations,
and the proxy's CPU per request (/proc).  Per probe: the steps of each state
with their longest and total thread CPU milliseconds, the figure that other
work on the machine does not stretch.  Raw results go to
C{bench/results/gcsteps-<time>.json}.  Hold the bench lock around it:
C{flock /tmp/bench.lock python3 bench/gcsteps.py ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import latency  # noqa: E402
import run  # noqa: E402
from run import processes  # noqa: E402

STATES = ("scanning", "marking", "sweeping", "finalizing")


def parse_variant(text):
    name, _, settings = text.partition(":")
    env = {}
    for item in filter(None, settings.split(",")):
        key, _, value = item.partition("=")
        env[key] = value
    return name, env


def start_proxy(running, python, pool, env_extra, out_path):
    port = processes.free_port()
    pool = dict(pool, listen="%s:%d" % (latency.HOST, port))
    path = processes.write_config({"bench": pool, "global": {"worker_processes": 0}})
    env = processes.proxy_env()
    env.update(env_extra)
    env["PAUSES_OUT"] = out_path
    env["PAUSES_MS"] = "1.0"
    argv = [python, os.path.join(HERE, "pauses.py"), "-c", path] + processes.stats_args()
    proc = processes.Process(argv, port, env=env, cwd=ROOT)
    return running.add(proc), port


def read_pauses(path):
    """(events, long iterations, probe steps) of a bench/pauses.py output file."""
    events, longs, probes = [], [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if parts[0] == "EV":
                events.append((float(parts[1]), parts[2], parts[3:]))
            elif parts[0] == "LONG":
                longs.append((float(parts[1]), float(parts[2][:-2])))
            elif parts[0] == "PROBE":
                probes.append((int(parts[1]), float(parts[2]), float(parts[3]), int(parts[4]), int(parts[5])))
    return events, longs, probes


def probe_summary(probes):
    """Per probed collection and state: steps, longest and total CPU milliseconds."""
    out = []
    for k in sorted({p[0] for p in probes}):
        steps = [p for p in probes if p[0] == k]
        one = {}
        for state in range(4):
            cpu = [p[1] for p in steps if p[3] == state]
            one[STATES[state]] = {"n": len(cpu), "max_cpu_ms": max(cpu or [0.0]), "sum_cpu_ms": sum(cpu),
                                  "all_cpu_ms": [round(c, 2) for c in cpu]}
        out.append(one)
    return out


def gc_summary(events, longs, start, end):
    """The collector's work between C{start} and C{end} (monotonic seconds)."""
    minors = [e for e in events if e[1] == "minor" and start <= e[0] < end]
    steps = [e for e in events if e[1] == "step" and start <= e[0] < end]
    majors = [e for e in events if e[1] == "major" and start <= e[0] < end]
    out = {"seconds": end - start, "minor": len(minors), "major": len(majors),
           "minor_ms_max": max([float(e[2][1]) * 1e3 for e in minors] or [0.0]),
           "heap_mb": float(minors[-1][2][2]) / 1e6 if minors else None,
           "long_iterations": sum(1 for t, _ in longs if start <= t < end),
           "longest_iteration_ms": max([ms for t, ms in longs if start <= t < end] or [0.0])}
    for state in range(4):
        durations = [float(e[2][1]) * 1e3 for e in steps if int(e[2][2]) == state]
        out[STATES[state]] = {"n": len(durations), "max_ms": max(durations or [0.0]),
                              "sum_ms": sum(durations), "all_ms": [round(d, 2) for d in durations]}
    out["jit"] = sum(1 for e in events if e[1] == "jit" and start <= e[0] < end)
    return out


def cpu_seconds(pid):
    """User + system CPU seconds of process C{pid} so far (/proc, as bench/run.py's CPU per request)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(os.sysconf("SC_CLK_TCK"))


def one_run(running, gen, python, pool, name, env, args):
    fd, out_path = tempfile.mkstemp(prefix="gcsteps-", suffix=".txt")
    os.close(fd)
    proc, port = start_proxy(running, python, pool, env, out_path)
    windows = []
    try:
        run.wait_ready(port, args.protocol)
        warm = gen.closed(port, args.warmup)
        latency.check(warm, "warm-up")
        if env.get("GCSTEPS_COLLECT"):
            # A full collection between the warm-up and the measured load (pauses.py's probe: the
            # collection in progress finished, then one whole one), as a proxy could run before serving.
            proc.signal(signal.SIGWINCH)
            time.sleep(1.5)
        for rate in args.rates:
            t0, cpu0 = time.monotonic(), cpu_seconds(proc.pid)
            result = gen.open(port, rate, args.seconds, args.rounds)
            t1, cpu1 = time.monotonic(), cpu_seconds(proc.pid)
            latency.check(result, "%s at %d/s" % (name, rate))
            result["cpu_us_per_request"] = (cpu1 - cpu0) * 1e6 / result["overall"]["n"]
            windows.append((rate, t0, t1, result))
        for _ in range(args.probes):
            proc.signal(signal.SIGWINCH)
            time.sleep(1.5)
    finally:
        proc.signal(signal.SIGTERM)
        try:
            proc.proc.wait(20)
        except Exception:
            pass
        running.stop(proc)
    events, longs, probes = read_pauses(out_path)
    os.unlink(out_path)
    probed = probe_summary(probes)
    for i, one in enumerate(probed):
        print("%-10s probe %d: %s" % (name, i, "  ".join(
            "%s %d steps max %.2f sum %.2f ms CPU" % (state, one[state]["n"], one[state]["max_cpu_ms"],
                                                      one[state]["sum_cpu_ms"])
            for state in STATES[:3])), flush=True)
    rows = []
    for rate, t0, t1, result in windows:
        gcs = gc_summary(events, longs, t0, t1)
        rows.append({"variant": name, "env": env, "rate": rate, "overall": result["overall"],
                     "cpu_us_per_request": result["cpu_us_per_request"],
                     "rounds": [{k: r[k] for k in ("p99", "max")} for r in result["rounds"]],
                     "gc": gcs, "probes": probed, "loadavg": os.getloadavg()[0]})
        o = gcs
        print("%-10s %6d/s  p50 %5.0f p99 %6.0f p99.9 %6.0f max %6.0f | minor %4d major %d scan %d/%.1f "
              "mark %d/%.1f/%.1f sweep %d/%.1f/%.1f heap %s MB long>1ms %d (%.1f) jit %d cpu %.1f us/req "
              "la %.2f" % (
                  name, rate, result["overall"]["p50"], result["overall"]["p99"], result["overall"]["p999"],
                  result["overall"]["max"], o["minor"], o["major"], o["scanning"]["n"], o["scanning"]["max_ms"],
                  o["marking"]["n"], o["marking"]["max_ms"], o["marking"]["sum_ms"], o["sweeping"]["n"],
                  o["sweeping"]["max_ms"], o["sweeping"]["sum_ms"],
                  "%.1f" % o["heap_mb"] if o["heap_mb"] else "-", o["long_iterations"],
                  o["longest_iteration_ms"], o["jit"], result["cpu_us_per_request"], os.getloadavg()[0]), flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("redis", "memcache"), default="redis")
    parser.add_argument("--rates", default="20000,5000")
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=30000)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--probes", type=int, default=3, help="whole collections stepped by hand after the load")
    parser.add_argument("--variant", action="append", default=[])
    parser.add_argument("--pypy", default=None)
    args = parser.parse_args(argv)
    args.rates = [int(r) for r in args.rates.split(",")]
    variants = [parse_variant(v) for v in (args.variant or ["base:"])]
    # bench/pauses.py imports the proxy from this checkout (PYTHONPATH), the venv gives its dependencies.
    python = args.pypy or os.path.join(ROOT, ".venv-pypy", "bin", "python")
    gen = latency.Generator(latency.build_generator(), args.protocol, 20, 10000, None, latency.realtime_allowed())
    running = run.Running()
    factory = processes.redis_server if args.protocol == "redis" else processes.memcached
    rows = []
    try:
        backend = running.add(factory())
        gen.preload(backend.port, 32)
        pool = processes.pool_config([backend.port], 0, redis=(args.protocol == "redis"))
        for turn in range(args.turns):
            for name, env in variants:
                rows += one_run(running, gen, python, pool, name, env, args)
    finally:
        running.stop_all()
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", "gcsteps-%s.json" % time.strftime("%Y%m%d-%H%M%S"))
    with open(path, "w") as f:
        json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print("==> %s" % (path,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
