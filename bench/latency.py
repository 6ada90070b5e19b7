"""
The latency benchmark: open-loop GETs at fixed request rates over long-lived
connections, against one backend directly ("direct"), nutcracker, and the proxy
on PyPy and CPython (one process and with workers), in front of that same
backend; one table of p50, p90, p99, p99.9 and max per target and rate, with
the latency each target adds over direct, and the first seconds after a fresh
start ("cold").

    python3 bench/latency.py                                  # the full run (long)
    python3 bench/latency.py --rounds 2 --seconds 2 --rates 5000
    python3 bench/latency.py --protocol redis --targets direct,cpython --workers 0

The load generator is bench/latgen.c, built on demand with gcc.  See
bench/README.md ("Latency") for what each run does and how to read it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: re-runs this script under the CPython venv if PyYAML is missing)
from run import BenchError, build_generator, processes  # noqa: E402

HOST = processes.HOST
DIRECT = run.DIRECT
# A cold round of a master lasts at least this long: its spare worker imports and warms up
# for about 3 s (it starts with the workers; it started 5 s after they were ready until the
# thirteenth #10 session), and whatever of that is left once they serve is part of what
# their first clients meet.
COLD_WORKERS_SECONDS = 10
GENERATOR = "generator"  # the no-op baseline: the generator's own schedule, no socket
PROXIES = ("pypy", "cpython")
# bench/floor.py on each interpreter: the proxy's I/O layer forwarding bytes, the least a Twisted process adds.
FLOORS = tuple(run.FLOOR + name for name in PROXIES)
SINGLE = (DIRECT, "nutcracker") + FLOORS  # targets run once, not once per worker count
PERCENTILES = ("p50", "p90", "p99", "p999", "max")
REALTIME_PRIORITY = 10  # SCHED_FIFO; the kernel's RT throttling still leaves 5% of each core to the rest


def realtime_allowed() -> bool:
    """Whether this process may give a child SCHED_FIFO (root or CAP_SYS_NICE)."""
    try:
        subprocess.run(["true"], preexec_fn=lambda: os.sched_setscheduler(
            0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY)), check=True)
    except (AttributeError, OSError, subprocess.SubprocessError):
        return False
    return True


# -- the generator ------------------------------------------------------------------

class Generator:
    """Runs latgen against one port; each method returns latgen's JSON (latencies in microseconds)."""

    def __init__(self, binary, protocol, connections, keys, pin=None, realtime=True):
        self.binary = binary
        self.protocol = protocol
        self.connections = connections
        self.keys = keys
        self.pin = pin
        self.realtime = realtime

    def _setup(self):
        """In the child before exec: CPU affinity and real-time priority, as asked."""
        if self.pin:
            os.sched_setaffinity(0, self.pin)
        if self.realtime:
            # Sending on time and reading replies at once, whatever else the 2 cores run:
            # under CFS the generator's own lateness reached milliseconds (see bench/README.md).
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(REALTIME_PRIORITY))

    def _run(self, args, timeout):
        argv = [self.binary, args[0], HOST, str(args[1]), self.protocol, str(self.connections), str(self.keys)]
        argv += [str(a) for a in args[2:]]
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout,
                                 preexec_fn=self._setup)
        except subprocess.TimeoutExpired:
            raise BenchError("latgen timed out after %ss" % (timeout,))
        if out.returncode != 0:
            raise BenchError("latgen exited %s: %s" % (out.returncode, out.stderr.strip()[-2000:]))
        return json.loads(out.stdout)

    def preload(self, port, value_size):
        """SET every key once (straight to the backend), so every GET after hits."""
        result = self._run(["preload", port, value_size], timeout=120)
        if result["errors"] or result["completed"] != self.keys:
            raise BenchError("preload: %s" % (result,))

    def closed(self, port, requests):
        """One request in flight per connection, C{requests} in all: the warm-up, and the maximum rate."""
        return self._run(["closed", port, requests], timeout=300)

    def open(self, port, rate, seconds, rounds):
        """C{rounds} rounds of C{seconds} at C{rate} requests/s, on one fixed schedule; port 0: no-op."""
        return self._run(["open", port, rate, seconds, rounds], timeout=seconds * rounds + 60)


# -- one protocol ---------------------------------------------------------------------

def targets_of(args, pythons):
    """[(target, workers)] in the order they run: direct first (the reference), then the rest."""
    out = []
    for name in args.targets:
        if name in SINGLE and (name in (DIRECT, "nutcracker") or interpreter(name) in pythons):
            out.append((name, 0))
    for workers in args.workers:
        out += [(name, workers) for name in PROXIES if name in args.targets and name in pythons]
    return out


def label(target, workers):
    return target if target in SINGLE or target == GENERATOR else "%s w=%d" % (target, workers)


def interpreter(target: str) -> str:
    """The interpreter name (a key of C{pythons}) that runs C{target}: "floor-pypy" runs on "pypy"."""
    return target[len(run.FLOOR):] if target.startswith(run.FLOOR) else target


def check(result, what):
    """A run whose replies did not all hit is not a latency figure."""
    if result["lost"] or result["errors"] or result["misses"]:
        raise BenchError("%s: %d lost, %d errors, %d misses of %d" % (
            what, result["lost"], result["errors"], result["misses"], result["requests"]))


def bench_protocol(running, protocol, args, pythons, gen_binary, rows):
    """
    One backend, preloaded; then per target: cold runs (a fresh start, then one
    round at each fixed rate with no warm-up before it), the closed-loop warm-up
    that also measures its maximum rate, and the measured runs at every rate.
    Direct runs again at the end at the other targets' fractional rates, so that
    every row has a reference.  A failing target is stopped and reported; the others go on.
    """
    factory = processes.redis_server if protocol == "redis" else processes.memcached
    backend = running.add(factory())
    gen = Generator(gen_binary, protocol, args.connections, args.keys, args.pin, args.realtime)
    pool = processes.pool_config([backend.port], 0, redis=(protocol == "redis"))
    try:
        gen.preload(backend.port, args.value_size)
        direct_rates = set()
        for target, workers in targets_of(args, pythons):
            name = label(target, workers)
            proc = None
            try:
                cold, proc = cold_rounds(running, gen, protocol, target, workers, pool, pythons, backend.port, args)
                if target == DIRECT:
                    port = backend.port
                elif proc is None:
                    proc, port = run.start_target(running, target, pool, pythons.get(interpreter(target)), workers)
                else:
                    port = proc.port
                run.wait_ready(port, protocol)
                warm = gen.closed(port, args.warmup * max(1, workers))
                check(warm, "%s warm-up" % (name,))
                maximum = warm["rps"]
                print("==> %s %-12s warm-up: %d requests closed-loop, %.0f/s (load average %.2f)" % (
                    protocol, name, warm["requests"], maximum, os.getloadavg()[0]), flush=True)
                rates = [(rate, None) for rate in args.rates]
                if target != DIRECT:
                    rates += [(max(100, int(round(maximum * f, -2))), f) for f in args.fractions]
                    direct_rates.update(rate for rate, _ in rates)
                else:
                    direct_rates.update(args.rates)
                for rate, fraction in rates:
                    rows.append(measure(gen, port, protocol, target, workers, rate, fraction, maximum, cold.get(rate),
                                        args, pid=proc.pid if proc is not None else None))
            except (BenchError, RuntimeError) as e:
                tail = proc.output()[-3000:] if proc is not None else ""
                print("!!! %s %s failed: %s\n%s" % (protocol, name, e, tail), file=sys.stderr)
                rows.append({"protocol": protocol, "target": target, "workers": workers, "error": str(e)})
            finally:
                if proc is not None:
                    running.stop(proc)
        if DIRECT in args.targets:
            extra = sorted(r for r in direct_rates if r not in args.rates)
            for rate in extra:
                try:
                    rows.append(measure(gen, backend.port, protocol, DIRECT, 0, rate, None, None, None, args))
                except BenchError as e:
                    print("!!! %s direct at %d/s failed: %s" % (protocol, rate, e), file=sys.stderr)
    finally:
        running.stop(backend)
    return direct_rates


def cold_rounds(running, gen, protocol, target, workers, pool, pythons, backend_port, args):
    """
    ({rate: stats}, the target's process or None): per fixed rate, a fresh start
    of the target, then one round at that rate as soon as it serves (no warm-up
    of ours): its port accepts a connection, and with workers every worker is
    ready (a master listens from its start).  What a client sees from the first
    second; with workers the round lasts at least L{COLD_WORKERS_SECONDS}, so
    that it takes in the spare worker's start too.  The last start is left
    running.
    """
    cold, proc = {}, None
    try:
        for rate in args.rates if args.cold else ():
            port = backend_port
            seconds = args.seconds
            if target != DIRECT:
                if proc is not None:
                    running.stop(proc)
                proc, port = run.start_target(running, target, pool, pythons.get(interpreter(target)), workers,
                                              settled=False)
                if workers:
                    seconds = max(seconds, COLD_WORKERS_SECONDS)
            result = gen.open(port, rate, seconds, 1)
            check(result, "%s cold at %d/s" % (label(target, workers), rate))
            cold[rate] = result["overall"]
            print("==> %s %-12s cold %6d/s: %s" % (protocol, label(target, workers), rate, brief(result["overall"])),
                  flush=True)
    except BaseException:
        if proc is not None:
            running.stop(proc)
        raise
    return cold, proc


def measure(gen, port, protocol, target, workers, rate, fraction, maximum, cold, args, pid=None):
    """
    The measured rounds at C{rate}; with the target's C{pid}, also its CPU per
    request over them (bench/run.py's definition: user + system CPU of its
    processes, read from /proc, divided by the requests), in microseconds.
    """
    before = run.cpu_times(pid) if pid else None
    result = gen.open(port, rate, args.seconds, args.rounds)
    cpu = None
    if before is not None:
        after = run.cpu_times(pid)
        cpu = {"user": (after[0] - before[0]) * 1e6 / result["completed"],
               "system": (after[1] - before[1]) * 1e6 / result["completed"]}
    check(result, "%s at %d/s" % (label(target, workers), rate))
    print("==> %s %-12s %6d/s%s: %s | rounds p99 %s, max %s%s" % (
        protocol, label(target, workers), rate, " (%d%% max)" % (fraction * 100) if fraction else "",
        brief(result["overall"]), " ".join("%.0f" % r["p99"] for r in result["rounds"]),
        " ".join("%.0f" % r["max"] for r in result["rounds"]),
        " | cpu %.1f us/req" % (cpu["user"] + cpu["system"]) if cpu else ""), flush=True)
    return {"protocol": protocol, "target": target, "workers": workers, "rate": rate, "fraction": fraction,
            "max_rps": maximum, "overall": result["overall"], "rounds": result["rounds"], "cold": cold,
            "elapsed_s": result["elapsed_s"], "loadavg": os.getloadavg()[0], "cpu_us": cpu}


def brief(stats):
    return " ".join("%s %.0f" % (p, stats[p]) for p in PERCENTILES) + " us"


def generator_rows(gen_binary, rates, args):
    """The generator's own jitter: the same schedules with no socket (each request 'done' when sent)."""
    gen = Generator(gen_binary, "redis", args.connections, args.keys, args.pin, args.realtime)
    rows = []
    for rate in sorted(rates):
        result = gen.open(0, rate, args.seconds, args.rounds)
        print("==> generator alone %6d/s: %s" % (rate, brief(result["overall"])), flush=True)
        rows.append({"protocol": "-", "target": GENERATOR, "workers": 0, "rate": rate, "fraction": None,
                     "max_rps": None, "overall": result["overall"], "rounds": result["rounds"], "cold": None,
                     "elapsed_s": result["elapsed_s"], "loadavg": os.getloadavg()[0]})
    return rows


def add_over_direct(rows):
    """Each row gets C{added} (and C{cold_added}): its percentiles minus direct's at the same protocol and rate."""
    direct = {(r["protocol"], r["rate"]): r for r in rows if r["target"] == DIRECT and "error" not in r}
    for r in rows:
        base = direct.get((r["protocol"], r.get("rate")))
        if "error" in r or r["target"] in (DIRECT, GENERATOR) or base is None:
            continue
        r["added"] = {p: round(r["overall"][p] - base["overall"][p], 1) for p in PERCENTILES}
        if r["cold"] and base["cold"]:
            r["cold_added"] = {p: round(r["cold"][p] - base["cold"][p], 1) for p in PERCENTILES}


def _us(value):
    return "-" if value is None else "%.0f" % value


def _plus(value):
    return "-" if value is None else "%+.0f" % value


def _cpu(cpu):
    return "-" if not cpu else "%.1f" % (cpu["user"] + cpu["system"])


def table(rows) -> str:
    """The rows as a text table, microseconds; failed targets under it."""
    head = ("protocol", "target", "rate/s", "p50", "p90", "p99", "p99.9", "max",
            "+p50", "+p90", "+p99", "+p99.9", "+max", "p99 rounds", "cold p99", "cold max", "+cold p99",
            "+cold max", "gen late max", "cpu us/req")
    lines, errors = [], []
    for r in rows:
        if "error" in r:
            errors.append("%s %s FAILED (%s)" % (r["protocol"], label(r["target"], r["workers"]),
                                                 r["error"].splitlines()[0]))
            continue
        o, a = r["overall"], r.get("added", {})
        cold, cold_added = r.get("cold") or {}, r.get("cold_added", {})
        p99s = [x["p99"] for x in r["rounds"]]
        rate = "%d" % r["rate"] + (" (%d%%)" % (r["fraction"] * 100) if r["fraction"] else "")
        lines.append((r["protocol"], label(r["target"], r["workers"]), rate)
                     + tuple(_us(o[p]) for p in PERCENTILES) + tuple(_plus(a.get(p)) for p in PERCENTILES)
                     + ("%.0f-%.0f" % (min(p99s), max(p99s)), _us(cold.get("p99")), _us(cold.get("max")),
                        _plus(cold_added.get("p99")), _plus(cold_added.get("max")), _us(o.get("late_max")),
                        _cpu(r.get("cpu_us"))))
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines] + errors)


# -- the run ------------------------------------------------------------------------

def _numbers(text, kind, what):
    try:
        return [kind(x) for x in text.split(",") if x]
    except ValueError:
        raise SystemExit("%s takes comma-separated numbers, not %r" % (what, text))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("redis", "memcache", "all"), default="all")
    parser.add_argument("--targets", default="direct,nutcracker,pypy,cpython",
                        help="comma-separated: direct, nutcracker, pypy, cpython, floor-pypy, floor-cpython "
                             "(default: all but the floors)")
    parser.add_argument("--workers", default="0,2",
                        help="the proxy's global: worker_processes, one run per count (default 0,2)")
    parser.add_argument("--rates", default="1000,5000,20000", help="fixed request rates per second (default 1000,5000,20000)")
    parser.add_argument("--fractions", default="0.5,0.8",
                        help="also these fractions of each target's measured maximum (default 0.5,0.8; '' for none)")
    parser.add_argument("--rounds", type=int, default=10, help="consecutive measured rounds per rate (default 10)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per round (default 4)")
    parser.add_argument("--warmup", type=int, default=50000,
                        help="closed-loop warm-up requests per target and worker, before the measured rates (default 50000)")
    parser.add_argument("--no-cold", dest="cold", action="store_false",
                        help="skip the cold rounds (a fresh start, then one round at each fixed rate)")
    parser.add_argument("--connections", type=int, default=20, help="long-lived connections (default 20)")
    parser.add_argument("--keys", type=int, default=10000, help="keys, preloaded so every GET hits (default 10000)")
    parser.add_argument("--value-size", type=int, default=32, help="bytes per value (default 32)")
    parser.add_argument("--no-generator", dest="generator", action="store_false",
                        help="skip the generator's own jitter rows (its schedule with no socket)")
    parser.add_argument("--pin", help="CPUs for the generator, e.g. 1 (default: no pinning)")
    parser.add_argument("--no-realtime", dest="realtime", action="store_false",
                        help="run the generator under the normal scheduler, not SCHED_FIFO (default: SCHED_FIFO when allowed)")
    parser.add_argument("--pypy", help="PyPy venv directory or interpreter")
    parser.add_argument("--cpython", help="CPython venv directory or interpreter")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    args.targets = [t for t in args.targets.split(",") if t]
    unknown = set(args.targets) - set(SINGLE) - set(PROXIES)
    if unknown:
        parser.error("unknown target(s): %s" % (", ".join(sorted(unknown)),))
    args.workers = _numbers(args.workers, int, "--workers")
    args.rates = _numbers(args.rates, int, "--rates")
    args.fractions = _numbers(args.fractions, float, "--fractions")
    args.pin = set(_numbers(args.pin, int, "--pin")) if args.pin else None
    return args


def main_checkout_venv(name) -> str:
    """.venv-NAME of the repository's main checkout (this one may be a git worktree without venvs)."""
    try:
        common = subprocess.check_output(["git", "rev-parse", "--path-format=absolute", "--git-common-dir"],
                                         cwd=ROOT, text=True, stderr=subprocess.DEVNULL).strip()
    except (OSError, subprocess.CalledProcessError):
        return os.path.join(ROOT, ".venv-" + name)
    return os.path.join(os.path.dirname(common), ".venv-" + name)


def versions() -> dict:
    out = {}
    for tool, flag in (("nutcracker", "-V"), ("redis-server", "--version"), ("memcached", "-V")):
        out[tool] = subprocess.run([tool, flag], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True).stdout.strip()
    return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, run._terminate)
    run.ensure_tools()
    if args.realtime and not realtime_allowed():
        print("==> no permission for SCHED_FIFO: the generator runs under the normal scheduler", flush=True)
        args.realtime = False
    pythons = {}
    for name in PROXIES:
        if name in args.targets or run.FLOOR + name in args.targets:
            pythons[name] = run.find_python(name, getattr(args, name), main_checkout_venv(name))
    protocols = ["redis", "memcache"] if args.protocol == "all" else [args.protocol]
    running = run.Running()
    rows = []
    meta = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git": run._git_state(), "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(), "generator": "bench/latgen.c (C, epoll, open loop)",
        "pin": sorted(args.pin) if args.pin else None, "realtime": args.realtime,
        "interpreters": {name: {"python": py, "version": run.describe(py)} for name, py in pythons.items()},
        "versions": versions(),
        "settings": {k: getattr(args, k) for k in ("rates", "fractions", "rounds", "seconds", "warmup", "cold",
                                                   "connections", "keys", "value_size", "workers", "targets")},
        "units": "microseconds",
    }
    print("==> open loop, %d connections, rounds %d x %gs, warm-up %d, rates %s + %s of max; %s" % (
        args.connections, args.rounds, args.seconds, args.warmup, args.rates, args.fractions,
        ", ".join("%s: %s" % (k, v["version"]) for k, v in meta["interpreters"].items())), flush=True)
    try:
        binary = build_generator()
        rates = set(args.rates)
        for protocol in protocols:
            rates |= bench_protocol(running, protocol, args, pythons, binary, rows)
        if args.generator:
            rows += generator_rows(binary, rates, args)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    except BenchError as e:
        print("bench: %s" % (e,), file=sys.stderr)
        return 1
    finally:
        running.stop_all()
    add_over_direct(rows)
    meta["loadavg_end"] = os.getloadavg()
    path = run.save_results(args.results, "latency-", {"meta": meta, "results": rows})
    print()
    print(table(rows))
    print("\nmicroseconds, from each request's due time to its reply (open loop); +X = X minus direct's at the same rate;")
    print("p99 rounds = the lowest and highest round's p99; cold = one round right after a fresh start, no warm-up")
    print("    (with workers: from every worker ready, for at least %d s, the spare worker's start taken in);"
          % COLD_WORKERS_SECONDS)
    print("gen late max = the generator's worst lateness sending a request (its own jitter, counted in the latency);")
    print("cpu us/req = user + system CPU of the target's processes over the measured rounds, per request.")
    print("Results: %s" % (os.path.relpath(path),))
    return 0


if __name__ == "__main__":
    sys.exit(main())
