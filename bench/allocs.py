"""
What the proxy allocates per request: its garbage collector's own counts over a
measured run of bench/run.py's load, per 100000 requests, next to its CPU per
request.

    python3 bench/allocs.py --protocol redis                       # PyPy venv
    python3 bench/allocs.py --protocol memcache --python .venv-cpython/bin/python
    python3 bench/allocs.py --baseline /tmp/main-copy --rounds 3   # A/B, interleaved

The proxy runs under this file's C{--child} mode: the C{cacheproxy} command
with counting hooks in the garbage collector, which writes the counts so far to
a file on SIGWINCH (a signal the proxy does not use).  On PyPy: minor
collections (times the nursery size, about the bytes allocated in the nursery),
steps of incremental major collections and their seconds (C{gc.hooks}); on
CPython: collections of generation 0 (each about 700 more container objects
allocated than freed; C{gc.callbacks}).

With C{--baseline DIR} (another checkout of the project, e.g. C{git archive
main | tar -x -C DIR}) a second proxy runs DIR's code on the same interpreter;
the measured runs alternate between the two, round by round, so that other load
on the machine falls on both.  Counts are exact; the CPU figures are noisy on a
shared machine (compare medians).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

COUNTERS = ("minor", "minor_seconds", "steps", "step_seconds", "gen0", "jit_aborts", "jit_compiled")


def child(out: str, argv: list) -> int:
    """Run the proxy (C{cacheproxy} arguments C{argv}) with counting GC hooks."""
    counts = dict.fromkeys(COUNTERS, 0)
    if hasattr(gc, "hooks"):  # PyPy
        def on_minor(stats):
            counts["minor"] += stats.count
            counts["minor_seconds"] += stats.duration

        def on_step(stats):
            counts["steps"] += stats.count
            counts["step_seconds"] += stats.duration

        gc.hooks.on_gc_minor = on_minor
        gc.hooks.on_gc_collect_step = on_step
    else:
        def on_collect(phase, info):
            if phase == "start" and info.get("generation") == 0:
                counts["gen0"] += 1

        gc.callbacks.append(on_collect)

    try:
        import pypyjit
    except ImportError:
        pass
    else:
        aborts = {}

        def on_abort(driver, greenkey, reason, operations=None):
            counts["jit_aborts"] += 1
            key = "%s %s" % (reason, repr(greenkey)[:120])
            aborts[key] = aborts.get(key, 0) + 1

        def on_compile(info):
            counts["jit_compiled"] += 1

        if os.environ.get("ALLOCS_JIT"):  # JIT parameters to try, e.g. trace_limit=12000
            pypyjit.set_param(os.environ["ALLOCS_JIT"])
        pypyjit.set_abort_hook(on_abort)
        pypyjit.set_compile_hook(on_compile, operations=False)
        if os.environ.get("ALLOCS_ABORTS"):  # where to list the aborted traces at exit
            import atexit

            @atexit.register
            def list_aborts():
                with open(os.environ["ALLOCS_ABORTS"], "w") as f:
                    for key, n in sorted(aborts.items(), key=lambda item: -item[1]):
                        f.write("%d %s\n" % (n, key))

    def dump(signum, frame):
        with open(out + ".tmp", "w") as f:
            f.write(" ".join("%s=%r" % item for item in counts.items()))
        os.rename(out + ".tmp", out)

    signal.signal(signal.SIGWINCH, dump)
    from twistedproxy.cli import main

    return main(argv)


def read_counts(proc, out: str) -> dict:
    """The child's counts now."""
    if os.path.exists(out):
        os.unlink(out)
    proc.proc.send_signal(signal.SIGWINCH)
    deadline = time.monotonic() + 10.0
    while not os.path.exists(out):
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy wrote no counts:\n" + proc.output()[-2000:])
        time.sleep(0.01)
    with open(out) as f:
        return {k: float(v) for k, v in (item.split("=") for item in f.read().split())}


def main(argv=None) -> int:
    sys.path.insert(0, HERE)
    import run  # bench/run.py: processes, loads, interpreters

    processes = run.processes
    parser = argparse.ArgumentParser(description="the proxy's GC counts and CPU per request under load")
    parser.add_argument("--protocol", choices=("redis", "memcache"), default="redis")
    parser.add_argument("--python", help="interpreter (default: the PyPy venv bench/run.py finds)")
    parser.add_argument("--baseline", help="another checkout to measure the same way, interleaved")
    parser.add_argument("--baseline-env", action="append", default=[], metavar="KEY=VALUE",
                        help="set in the baseline's environment only (e.g. ALLOCS_JIT=trace_limit=12000: JIT "
                        "parameters its child sets; the baseline may be this very checkout)")
    parser.add_argument("-n", "--requests", type=int, default=100000)
    parser.add_argument("--pipeline", type=int, choices=(1, run.PIPELINE), help="only this pipelining")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--mc-loader", choices=run.MC_LOADERS, default="mcload")
    args = parser.parse_args(argv)
    python = os.path.abspath(args.python) if args.python else run.find_python("pypy", None, "/tmp/vpy")
    loader = run.shutil.which("pypy3") or sys.executable
    load = run.Load(args.protocol, args.requests, False, loader, args.mc_loader)
    running = run.Running()
    trees = [("checkout", run.ROOT)] + ([("baseline", os.path.abspath(args.baseline))] if args.baseline else [])
    pipelines = [args.pipeline] if args.pipeline else [run.PIPELINE, 1]
    from twistedproxy.process import nursery

    results = {}  # (tree, pipeline) -> [per-round dicts]
    try:
        servers = run.backends(running, args.protocol)
        proxies = []
        for name, root in trees:
            port = processes.free_port()
            pool = processes.pool_config([s.port for s in servers], port, redis=(args.protocol == "redis"))
            conf = processes.write_config({"bench": pool})
            out = "%s/tp-allocs-%d-%s.txt" % (run.tempfile.gettempdir(), os.getpid(), name)
            env = dict(os.environ, PYTHONPATH=root)
            if name == "baseline":
                env.update(item.split("=", 1) for item in args.baseline_env)
            env.setdefault(nursery.ENV, nursery.SIZE)  # what the command's re-exec would set
            cmd = [python, os.path.join(HERE, "allocs.py"), "--child", out, "--", "-c", conf,
                   "-s", str(processes.free_port()), "-a", processes.HOST]
            proc = running.add(processes.Process(cmd, port, env=env, cwd=root))
            run.wait_ready(port, args.protocol)
            print("==> %s: warming up" % (name,), flush=True)
            load.warm_up(port)
            proxies.append((name, proc, port, out))
        for round_ in range(args.rounds):
            for name, proc, port, out in proxies:
                for pipeline in pipelines:
                    before = read_counts(proc, out)
                    cpu_before = run.cpu_times(proc.pid)
                    tests = load.run(port, pipeline, args.requests)
                    cpu_after = run.cpu_times(proc.pid)
                    after = read_counts(proc, out)
                    count = args.requests * len(tests)
                    row = {k: (after[k] - before[k]) * 100000.0 / count for k in COUNTERS}
                    row["cpu_us"] = sum(a - b for a, b in zip(cpu_after, cpu_before)) * 1e6 / count
                    row["rps"] = statistics.median(t["rps"] for t in tests.values())
                    results.setdefault((name, pipeline), []).append(row)
                    print("    round %d %-8s P=%-2d minor/100k %7.1f (%.2f us/req)  steps/100k %5.1f  gen0/100k %7.1f"
                          "  cpu %6.2f us/req  %8.0f req/s  jit aborts %d compiled %d (load %.2f)" % (
                              round_ + 1, name, pipeline, row["minor"], row["minor_seconds"] * 10.0, row["steps"], row["gen0"],
                              row["cpu_us"], row["rps"], row["jit_aborts"] * count / 100000.0,
                              row["jit_compiled"] * count / 100000.0, os.getloadavg()[0]), flush=True)
    finally:
        running.stop_all()
    print("\n%s on %s, %d requests a run, medians over %d rounds (nursery %s):" % (
        args.protocol, run.describe(python), args.requests, args.rounds, os.environ.get(nursery.ENV, nursery.SIZE)))
    for (name, pipeline), rows in sorted(results.items()):
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        cpus = ", ".join("%.2f" % r["cpu_us"] for r in rows)
        print("  %-8s P=%-2d minor/100k %7.1f  steps/100k %5.1f (%.1f ms)  gen0/100k %7.1f  cpu %.2f us/req [%s]" % (
            name, pipeline, med["minor"], med["steps"], med["step_seconds"] * 1000.0, med["gen0"], med["cpu_us"], cpus))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[4:]))
    sys.exit(main())
