"""
The Redis Cluster benchmark: the same redis-benchmark SET/GET load through a
cluster pool (the proxy in front of a 3-master Redis Cluster, one seed), through
a hash pool over the same number of standalone redis-servers, and with
`redis-benchmark --cluster` straight to the cluster (no proxy); requests/s,
p50/p99 and CPU microseconds per request of the proxy, of the Redis servers and
of the load tool, pipelined (-P 16) and not.

    python3 bench/cluster.py                  # 200000 requests a run, 3 rounds, PyPy and CPython
    python3 bench/cluster.py --quick          # 40000 requests, 1 round
    python3 bench/cluster.py --only pypy -n 100000 --repeat 2

See bench/README.md ("Redis Cluster") for how to read it.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import run  # noqa: E402  (bench/run.py: re-runs this script under the CPython venv if PyYAML is missing)
from run import BenchError, processes  # noqa: E402

sys.path.insert(0, run.ROOT)
from tests.support.cluster import Cluster  # noqa: E402

HOST = processes.HOST
MASTERS = 3
DIRECT = "cluster direct"  # redis-benchmark --cluster, no proxy
PROXIES = ("pypy", "cpython")


def cpu_of(pids) -> float:
    """User + system CPU seconds of C{pids} and their descendants (bench/run.py's measure)."""
    return sum(sum(run.cpu_times(pid)) for pid in pids)


def children_cpu() -> float:
    """CPU seconds of this process's waited-for children so far (the load tool runs as one)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Target:
    """A load's destination: a label, the port, the proxy's pid (None: no proxy), the servers' pids."""

    def __init__(self, label, port, proxy, servers, extra=()):
        self.label, self.port, self.proxy, self.servers, self.extra = label, port, proxy, servers, extra

    def load(self, requests, pipeline):
        """One redis-benchmark run; {test: result} with the CPU per request of proxy, servers and load tool."""
        timeout = max(60, requests // 2000)
        pids = [self.proxy.pid] if self.proxy else []
        proxy_before, servers_before, tool_before = cpu_of(pids), cpu_of(self.servers), children_cpu()
        results = run.redis_load(self.port, requests, pipeline, timeout, self.extra)
        count = float(requests * len(results))
        cpu = {
            "proxy_us": (cpu_of(pids) - proxy_before) * 1e6 / count if self.proxy else None,
            "servers_us": (cpu_of(self.servers) - servers_before) * 1e6 / count,
            "tool_us": (children_cpu() - tool_before) * 1e6 / count,
        }
        return {test: dict(result, **cpu) for test, result in results.items()}


def start_targets(running, cluster, standalone, pythons) -> list:
    """The cluster pool and the hash pool per interpreter, and the direct baseline."""
    node_pids = [n.process.pid for n in cluster.nodes]
    standalone_pids = [s.pid for s in standalone]
    targets = [Target(DIRECT, cluster.nodes[0].port, None, node_pids, ("--cluster",))]
    for name, python in pythons.items():
        port = processes.free_port()
        pool = {"listen": "%s:%d" % (HOST, port), "redis": True, "redis_cluster": True,
                "servers": ["%s:%d:1" % (HOST, cluster.nodes[0].port)], "timeout": 5000}
        proc = running.add(processes.proxy({"bench": pool}, port, python=python,
                                           extra_args=["-s", str(processes.free_port()), "-a", HOST]))
        targets.append(Target("%s cluster pool" % name, port, proc, node_pids))
        port = processes.free_port()
        pool = dict(processes.pool_config([s.port for s in standalone], port), timeout=5000)
        proc = running.add(processes.proxy({"bench": pool}, port, python=python,
                                           extra_args=["-s", str(processes.free_port()), "-a", HOST]))
        targets.append(Target("%s hash pool" % name, port, proc, standalone_pids))
    for target in targets:
        if target.proxy:
            run.wait_ready(target.port, "redis")
    return targets


def bench(args, pythons) -> list:
    running = run.Running()
    cluster = Cluster(masters=MASTERS, replicas=1, node_timeout=2000)
    rows = []
    try:
        cluster.start()
        standalone = [running.add(processes.redis_server()) for _ in range(MASTERS)]
        targets = start_targets(running, cluster, standalone, pythons)
        warm = (args.requests // 2, args.requests // 6)
        for target in targets:
            print("==> warming up %s" % (target.label,), flush=True)
            target.load(warm[0], run.PIPELINE)
            target.load(warm[1], 1)
        samples = {}
        for round_ in range(args.repeat):
            for target in targets:
                for pipeline in (run.PIPELINE, 1):
                    print("==> round %d/%d: %s P%d (load average %.2f)" % (
                        round_ + 1, args.repeat, target.label, pipeline, os.getloadavg()[0]), flush=True)
                    for test, result in target.load(args.requests, pipeline).items():
                        samples.setdefault((target.label, pipeline, test), []).append(result)
                        print("    %-4s %9.0f req/s  cpu us/req: proxy %s  servers %.2f  tool %.2f" % (
                            test, result["rps"], _us(result["proxy_us"]), result["servers_us"],
                            result["tool_us"]), flush=True)
        for (label, pipeline, test), results in samples.items():
            row = dict(sorted(results, key=lambda r: r["rps"])[len(results) // 2],
                       target=label, pipeline=pipeline, test=test, samples=[r["rps"] for r in results])
            for key in ("proxy_us", "servers_us", "tool_us"):  # each CPU figure is a median of its own
                values = sorted(r[key] for r in results if r[key] is not None)
                row[key] = values[len(values) // 2] if values else None
            rows.append(row)
    finally:
        running.stop_all()
        cluster.stop()
    return rows


def _us(value):
    return "-" if value is None else "%.2f" % value


def table(rows) -> str:
    head = ("test", "pipe", "target", "req/s", "p50 ms", "p99 ms", "proxy us/req", "servers us/req", "tool us/req")
    order = {DIRECT: 0}
    lines = [(r["test"], "P%d" % r["pipeline"], r["target"], "%.0f" % r["rps"], run._ms(r["p50_ms"]),
              run._ms(r["p99_ms"]), _us(r["proxy_us"]), _us(r["servers_us"]), _us(r["tool_us"]))
             for r in sorted(rows, key=lambda r: (-r["pipeline"], r["test"], order.get(r["target"], 1), r["target"]))]
    widths = [max(len(row[i]) for row in [head] + lines) for i in range(len(head))]

    def fmt(row):
        return "  ".join(c.rjust(w) if i >= 3 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(row) for row in lines])


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="%d requests per run, one round" % run.QUICK_REQUESTS)
    parser.add_argument("-n", "--requests", type=int, help="requests per measured run")
    parser.add_argument("--repeat", type=int, help="measured rounds (default 3; 1 with --quick)")
    parser.add_argument("--only", default="pypy,cpython", help="which proxies: pypy,cpython (default both)")
    parser.add_argument("--pypy", help="PyPy venv directory or interpreter")
    parser.add_argument("--cpython", help="CPython venv directory or interpreter")
    parser.add_argument("--results", default=os.path.join(HERE, "results"), help="where the JSON goes")
    args = parser.parse_args(argv)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.requests = args.requests or (run.QUICK_REQUESTS if args.quick else run.FULL_REQUESTS)
    args.only = [name for name in args.only.split(",") if name]
    unknown = set(args.only) - set(PROXIES)
    if unknown:
        parser.error("--only takes pypy and/or cpython, not %s" % (",".join(sorted(unknown)),))
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    run.ensure_tools()
    pythons = {name: run.find_python(name, getattr(args, name), "/nonexistent") for name in args.only}
    print("==> %d requests/run, %d clients, -r %d, P%d and P1; %d masters + %d replicas; %s" % (
        args.requests, run.CLIENTS, run.KEYSPACE, run.PIPELINE, MASTERS, MASTERS,
        ", ".join("%s: %s" % (k, run.describe(v)) for k, v in pythons.items())), flush=True)
    try:
        rows = bench(args, pythons)
    except KeyboardInterrupt:
        print("\ninterrupted; every process stopped", file=sys.stderr)
        return 130
    except (BenchError, RuntimeError) as e:
        print("bench: %s" % (e,), file=sys.stderr)
        return 1
    meta = {"requests": args.requests, "repeat": args.repeat, "clients": run.CLIENTS, "keyspace": run.KEYSPACE,
            "masters": MASTERS, "git": run._git_state(), "loadavg_end": os.getloadavg(),
            "interpreters": {k: run.describe(v) for k, v in pythons.items()}}
    path = run.save_results(args.results, "cluster-", {"meta": meta, "results": rows})
    print()
    print(table(rows))
    print("\nproxy/servers/tool us/req = user + system CPU of the proxy's processes, of the Redis servers of that")
    print("target (the 6 cluster nodes, or the hash pool's 3 redis-servers), of redis-benchmark, over the run,")
    print("divided by its requests; '%s' = redis-benchmark --cluster straight to the nodes, no proxy." % (DIRECT,))
    print("Results: %s" % (os.path.relpath(path),))
    return 0


if __name__ == "__main__":
    sys.exit(main())
