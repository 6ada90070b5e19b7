"""
The online migration benchmark (issue #13): a hash pool with C{migrate: true}
and 100k keys preloaded through the proxy, under a fixed-rate open-loop GET
load (bench/latgen.c, as bench/latency.py runs it), goes 3 -> 4 servers and
then 4 -> 3; for each migration: how long it took (the record's started to
finished), what it moved, and the clients' latency before it and during it.

    python3 bench/migrate.py                          # Redis and memcached, 100k keys, PyPy
    python3 bench/migrate.py --protocol redis --keys 20000 --load-rate 2000
    python3 bench/migrate.py --python cpython --migrate-rate 5000

Latency is measured in chunks of C{--chunk} one-second rounds (a latgen run
each): "before" is C{--before} seconds of them just before the reload, "during"
every chunk from the reload until the migration is done.  latgen gives exact
percentiles per one-second round, not for the whole phase: the table shows the
median round's p50 and p99 and the worst round's p99 and p99.9.  A GET that
misses (a key the migration lost sight of), an error or a lost reply is counted
in the last columns.  See bench/README.md ("Migration").
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import latency  # noqa: E402  (imports bench/run.py, which re-runs this under the CPython venv if need be)
import run  # noqa: E402
from run import BenchError, processes  # noqa: E402
import yaml  # noqa: E402  (after run: the CPython venv has it)

try:
    import twisted.protocols.amp  # noqa: F401, E402  (the control client's)
except ImportError:  # a python3 with PyYAML but not Twisted: go on under the CPython venv
    _venv = run.find_python("cpython", None, "/nonexistent")
    os.execv(_venv, [_venv] + sys.argv)

sys.path.insert(0, ROOT)
from tests.support import ctl  # noqa: E402
from tests.support.ctl import cacheproxyctl  # noqa: E402
from tests.support.migration_control import migration_ctl, wait_migration  # noqa: E402

HOST = processes.HOST
POOL = "bench"


class Phase:
    """The one-second rounds latgen measured in one phase (before, during), and their misses."""

    def __init__(self, name):
        self.name = name
        self.rounds = []
        self.requests = self.misses = self.errors = self.lost = 0

    def add(self, result):
        self.rounds += [r for r in result["rounds"] if r.get("n")]
        for key in ("requests", "misses", "errors", "lost"):
            setattr(self, key, getattr(self, key) + result[key])

    def figures(self) -> dict:
        if not self.rounds:
            return {"rounds": 0}
        return {"rounds": len(self.rounds), "requests": self.requests, "misses": self.misses, "errors": self.errors,
                "lost": self.lost, "p50": statistics.median(r["p50"] for r in self.rounds),
                "p99": statistics.median(r["p99"] for r in self.rounds),
                "worst_p99": max(r["p99"] for r in self.rounds), "worst_p999": max(r["p999"] for r in self.rounds)}


class ChunkedLoad(threading.Thread):
    """latgen runs of C{chunk} one-second rounds, back to back, into C{phase} until L{stop}."""

    def __init__(self, gen, port, rate, chunk, phase):
        threading.Thread.__init__(self, daemon=True)
        self.gen, self.port, self.rate, self.chunk, self.phase = gen, port, rate, chunk, phase
        self.running = True
        self.error = None

    def run(self):
        try:
            while self.running:
                self.phase.add(self.gen._run(["open", self.port, self.rate, 1, self.chunk], timeout=self.chunk + 60))
        except BenchError as e:
            self.error = e

    def stop(self):
        self.running = False
        self.join(120)
        if self.error:
            raise self.error


def start_proxy(running, protocol, ports, python, workers, rate, state_dir):
    """The proxy (master + C{workers}) with a C{migrate: true} pool over C{ports}; (process, port, config, control)."""
    port = processes.free_port()
    pool = processes.pool_config(ports, port, redis=(protocol == "redis"), migrate=True, migrate_rate=rate,
                                 timeout=5000)
    control = tempfile.mktemp(prefix="tp-bench-ctl-", suffix=".sock")
    config = {POOL: pool, "global": {"worker_processes": workers, "control": control, "state_dir": state_dir}}
    proc = running.add(processes.proxy(config, port, python=python))
    run.wait_ready(port, protocol)
    return proc, port, config, control


def migrate(proc, config, control, ports, gen, port, args):
    """Rewrite the file with C{ports}, reload, measure until the migration is done; the table's row."""
    before = Phase("before")
    load = ChunkedLoad(gen, port, args.load_rate, args.chunk, before)
    load.start()
    time.sleep(args.before)
    load.stop()
    during = Phase("during")
    load = ChunkedLoad(gen, port, args.load_rate, args.chunk, during)
    load.start()
    path = proc.argv[proc.argv.index("-c") + 1]
    config[POOL] = dict(config[POOL], servers=["%s:%d:1" % (HOST, p) for p in ports])
    with open(path + ".tmp", "w") as f:
        yaml.safe_dump(config, f, sort_keys=False)
    os.replace(path + ".tmp", path)
    reloaded = time.time()
    code, out, err = cacheproxyctl(control, "reload")
    if code != 0:
        load.stop()
        raise BenchError("reload refused: %s%s" % (out, err))
    errors = []
    try:
        while True:
            record = wait_migration(control, POOL, states=("done", "paused"), timeout=args.timeout)
            if record["state"] == "done":
                break
            # Paused by a failure: say so, and go on as an operator would.
            errors.append(record["error"])
            print("!!! the migration paused: %s; resuming" % (record["error"],), file=sys.stderr, flush=True)
            migration_ctl(control, "resume", POOL)
    finally:
        load.stop()
    return {"seconds": record["finished"] - record["started"], "reload_to_done": time.time() - reloaded,
            "record": record, "pauses": errors, "before": before.figures(), "during": during.figures()}


def bench_protocol(running, protocol, args, python, binary, rows):
    factory = processes.redis_server if protocol == "redis" else processes.memcached
    backends = [running.add(factory()) for _ in range(4)]
    ports = [b.port for b in backends]
    state_dir = tempfile.mkdtemp(prefix="tp-bench-migrate-")
    proc, port, config, control = start_proxy(running, protocol, ports[:3], python, args.workers,
                                              args.migrate_rate, state_dir)
    try:
        gen = latency.Generator(binary, protocol, args.connections, args.keys, None, args.realtime)
        started = time.time()
        gen.preload(port, args.value_size)
        print("==> %s: %d keys preloaded through the proxy in %.1fs" % (protocol, args.keys, time.time() - started),
              flush=True)
        for name, target in (("3 -> 4", ports), ("4 -> 3", [ports[0], ports[2], ports[3]])):
            row = migrate(proc, config, control, target, gen, port, args)
            row.update(protocol=protocol, migration=name)
            rec = row["record"]
            print("==> %s %s: %.1fs, %d scanned, %d moved, %d skipped, %d failed, %d bytes" % (
                protocol, name, row["seconds"], rec["scanned"], rec["moved"], rec["skipped"], rec["failed"],
                rec["bytes"]), flush=True)
            rows.append(row)
    except (BenchError, RuntimeError, AssertionError) as e:
        print("!!! %s failed: %s\n%s" % (protocol, e, proc.output()[-3000:]), file=sys.stderr)
        rows.append({"protocol": protocol, "error": str(e)})
    finally:
        running.stop(proc)
        for backend in backends:
            running.stop(backend)


def _ms(us):
    return "%.2f" % (us / 1000.0) if us is not None else "-"


def table(rows) -> str:
    head = ("protocol", "migration", "seconds", "moved", "keys/s", "pauses", "phase", "p50 ms", "p99 ms",
            "worst p99", "worst p99.9", "requests", "misses", "errors", "lost")
    lines = [head]
    notes = []
    for row in rows:
        if "error" in row:
            notes.append("%s FAILED: %s" % (row["protocol"], row["error"]))
            continue
        rec = row["record"]
        notes += ["%s %s paused: %s" % (row["protocol"], row["migration"], e) for e in row["pauses"]]
        for phase in ("before", "during"):
            f = row[phase]
            first = phase == "before"
            lines.append((row["protocol"] if first else "", row["migration"] if first else "",
                          "%.1f" % row["seconds"] if first else "", str(rec["moved"]) if first else "",
                          "%.0f" % (rec["moved"] / row["seconds"]) if first and row["seconds"] else "",
                          str(len(row["pauses"])) if first else "",
                          phase, _ms(f.get("p50")), _ms(f.get("p99")), _ms(f.get("worst_p99")),
                          _ms(f.get("worst_p999")), str(f.get("requests", 0)), str(f.get("misses", 0)),
                          str(f.get("errors", 0)), str(f.get("lost", 0))))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    text = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)
    return "\n".join([text] + notes)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--protocol", choices=("redis", "memcache", "all"), default="all")
    parser.add_argument("--keys", type=int, default=100000, help="keys preloaded and read (default 100000)")
    parser.add_argument("--value-size", type=int, default=100, help="bytes per value (default 100)")
    parser.add_argument("--load-rate", type=int, default=2000, help="GETs a second, open loop (default 2000)")
    parser.add_argument("--connections", type=int, default=20, help="the load's connections (default 20)")
    parser.add_argument("--migrate-rate", type=int, default=0,
                        help="the pool's migrate_rate, keys a second (default 0: unlimited)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--before", type=float, default=5.0, help="seconds measured before each migration")
    parser.add_argument("--chunk", type=int, default=2, help="one-second rounds per latgen run (default 2)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a migration may take")
    parser.add_argument("--python", default="pypy",
                        help="pypy, cpython (the repo's venvs) or an interpreter/venv to run the proxy with")
    parser.add_argument("--no-realtime", dest="realtime", action="store_false",
                        help="do not run the generator SCHED_FIFO")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    args.realtime = args.realtime and latency.realtime_allowed()
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    signal.signal(signal.SIGTERM, run._terminate)
    run.ensure_tools()
    if args.python in ("pypy", "cpython"):
        python = run.find_python(args.python, None, "/nonexistent")
    else:
        python = run.find_python("proxy", args.python, "/nonexistent")
    ctl.PYTHON = python
    binary = latency.build_generator()
    protocols = ["redis", "memcache"] if args.protocol == "all" else [args.protocol]
    print("==> %d keys, %d GETs/s open loop on %d connections, migrate_rate %s, %d worker(s), proxy on %s" % (
        args.keys, args.load_rate, args.connections, args.migrate_rate or "unlimited", args.workers,
        run.describe(python)), flush=True)
    running = run.Running()
    rows = []
    try:
        for protocol in protocols:
            bench_protocol(running, protocol, args, python, binary, rows)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping every process", file=sys.stderr)
        return 130
    finally:
        running.stop_all()
    meta = {"keys": args.keys, "value_size": args.value_size, "load_rate": args.load_rate,
            "connections": args.connections, "migrate_rate": args.migrate_rate, "workers": args.workers,
            "python": run.describe(python), "git": run._git_state(), "cpus": os.cpu_count(),
            "loadavg": os.getloadavg()}
    path = run.save_results(args.results, "migrate-", {"meta": meta, "results": rows})
    print()
    print(table(rows))
    print("\nseconds = the migration's record, started to finished; keys/s = moved / seconds;")
    print("p50, p99 = the median one-second round's; worst = the worst round's (latgen, open loop, exact per round).")
    print("Results: %s" % (os.path.relpath(path),))
    return 1 if any("error" in row or row["pauses"] or row["during"].get("misses") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
