"""
What a shadow route costs the real requests: open-loop GETs at a fixed rate
(bench/latgen.c) through the proxy to one memcached, three ways: a plain pool;
a front that shadows every request to a second memcached; the same with that
memcached frozen (SIGSTOP), so its queue stays full and every copy after the
first C{queue} is dropped.  One table of p50, p90, p99, p99.9 and max, and the
shadow's counters from the stats port.

    python3 bench/shadow.py                        # PyPy, 5000/s, 5 rounds of 4 s
    python3 bench/shadow.py --python cpython --rate 2000 --rounds 3

The integration tests check that a frozen shadow fails nothing
(tests/test_cluster_routes_integration.py); this measures the time, which a
test must not.
"""

from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import latency  # noqa: E402
import run  # noqa: E402
from run import BenchError, processes  # noqa: E402

HOST = processes.HOST


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--python", choices=latency.PROXIES, default="pypy")
    parser.add_argument("--interpreter", help="the interpreter's path (default: the checkout's venv)")
    parser.add_argument("--rate", type=int, default=5000, help="requests per second (default 5000)")
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per round (default 4)")
    parser.add_argument("--queue", type=int, default=1024, help="the shadow route's queue (default 1024)")
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--keys", type=int, default=10000)
    parser.add_argument("--warmup", type=int, default=50000, help="closed-loop GETs before measuring")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run.ensure_tools()
    python = run.find_python(args.python, args.interpreter, latency.main_checkout_venv(args.python))
    running = run.Running()
    rows = []
    try:
        gen = latency.Generator(latency.build_generator(), "memcache", args.connections, args.keys,
                                realtime=latency.realtime_allowed())
        real = running.add(processes.memcached())
        shadow = running.add(processes.memcached())
        gen.preload(real.port, 32)
        leaf = lambda proc: {"servers": ["%s:%d:1" % (HOST, proc.port)]}
        for name in ("plain pool", "shadow", "shadow frozen"):
            port, stats_port = processes.free_port(), processes.free_port()
            listen = "%s:%d" % (HOST, port)
            if name == "plain pool":
                config = {"front": dict(leaf(real), listen=listen)}
            else:
                config = {"real": leaf(real), "copy": leaf(shadow),
                          "front": {"listen": listen, "route": {"shadow": "real", "copy_to": "copy",
                                                                "queue": args.queue}}}
            proxy = running.add(processes.proxy(config, port, python=python,
                                                extra_args=["-s", str(stats_port), "-a", HOST]))
            try:
                run.wait_ready(port, "memcache")
                latency.check(gen.closed(port, args.warmup), "%s warm-up" % (name,))
                if name == "shadow frozen":
                    shadow.freeze()
                result = gen.open(port, args.rate, args.seconds, args.rounds)
                latency.check(result, name)
                counters = {k: v for k, v in processes.read_stats_port(stats_port)["front"].items()
                            if k.startswith("shadow_")}
                rows.append((name, result["overall"], counters))
                print("==> %-14s %s %s" % (name, latency.brief(result["overall"]), counters), flush=True)
            finally:
                shadow.thaw()
                running.stop(proxy)
    except BenchError as e:
        print("bench: %s" % (e,), file=sys.stderr)
        return 1
    finally:
        running.stop_all()
    print("\n| %s, %d/s | %s | shadow counters |" % (args.python, args.rate, " | ".join(latency.PERCENTILES)))
    print("|---|%s---|" % ("---|" * len(latency.PERCENTILES)))
    for name, overall, counters in rows:
        print("| %s | %s | %s |" % (name, " | ".join("%.0f" % overall[p] for p in latency.PERCENTILES),
                                    ", ".join("%s %d" % (k[7:], v) for k, v in sorted(counters.items())) or "—"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
