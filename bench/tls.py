"""
What TLS costs: the same Redis load (redis-benchmark set,get, 50 clients) through
the proxy with plain TCP, with TLS from the clients (redis-benchmark --tls), and
with TLS on both sides (backends on redis-server --tls-port), and straight to a
backend with and without TLS (no proxy: what TLS costs Redis itself).  Prints
requests/s and the proxy's CPU per request (master and workers, /proc, as
bench/run.py measures it) for each, pipelined (-P 16) and not.

    python3 bench/tls.py                    # PyPy and CPython, one process, 100000 requests, median of 3
    python3 bench/tls.py --quick            # 20000 requests, 1 round
    python3 bench/tls.py --only pypy --workers 2

Certificates are made for the run (tests/support/tls.py) and removed after it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import run  # noqa: E402  (bench/run.py: processes, load, CPU accounting)
from tests.support import processes  # noqa: E402
from tests.support.tls import Certificates  # noqa: E402

HOST = processes.HOST
MODES = ("plain", "client TLS", "both sides TLS")


def tls_redis(running, certs):
    port = processes.free_port()
    cert, key = certs.backend
    return running.add(processes.redis_server(
        port, "--port", "0", "--tls-port", str(port), "--tls-cert-file", cert, "--tls-key-file", key,
        "--tls-ca-cert-file", certs.ca.path, "--tls-auth-clients", "no"))


def wait_ready(port, context, timeout=30.0):
    """Until 8 fresh connections each get a reply to a GET (through TLS when C{context})."""
    deadline = time.time() + timeout
    ok = 0
    while ok < 8:
        if time.time() > deadline:
            raise run.BenchError("port %d does not answer" % (port,))
        try:
            with socket.create_connection((HOST, port), timeout=2.0) as sock:
                if context is not None:
                    sock = context.wrap_socket(sock, server_hostname=HOST)
                sock.sendall(b"*2\r\n$3\r\nGET\r\n$11\r\nbench:probe\r\n")
                if sock.recv(64) == b"$-1\r\n":
                    ok += 1
                    continue
        except OSError:
            pass
        time.sleep(0.1)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="TLS throughput and CPU per request next to plain TCP.")
    parser.add_argument("--quick", action="store_true", help="20000 requests per run, one round")
    parser.add_argument("-n", "--requests", type=int)
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--workers", type=int, default=0, help="global: worker_processes (default 0)")
    parser.add_argument("--only", default="pypy,cpython", help="which proxies: pypy,cpython")
    parser.add_argument("--pypy")
    parser.add_argument("--cpython")
    args = parser.parse_args(argv)
    requests = args.requests or (20000 if args.quick else 100000)
    repeat = args.repeat or (1 if args.quick else 3)
    run.ensure_tools()
    pythons = {}
    if "pypy" in args.only:
        pythons["pypy"] = run.find_python("pypy", args.pypy, "pypy3")
    if "cpython" in args.only:
        pythons["cpython"] = run.find_python("cpython", args.cpython, "python3")

    directory = tempfile.mkdtemp(prefix="tp-bench-tls-")
    certs = Certificates(directory)
    context = certs.client_context()
    tls_args = ["--tls", "--cacert", certs.ca.path]
    running = run.Running()
    rows = []
    try:
        plain_backends = [running.add(processes.redis_server()) for _ in range(2)]
        tls_backends = [tls_redis(running, certs) for _ in range(2)]
        cert, key = certs.proxy
        pools = {
            "plain": {"redis": True, "servers": ["%s:%d:1" % (HOST, b.port) for b in plain_backends]},
            "client TLS": {"redis": True, "servers": ["%s:%d:1" % (HOST, b.port) for b in plain_backends],
                           "tls_cert": cert, "tls_key": key},
            "both sides TLS": {"redis": True, "servers": ["%s:%d:1" % (HOST, b.port) for b in tls_backends],
                               "tls_cert": cert, "tls_key": key, "backend_tls": True,
                               "backend_tls_ca": certs.ca.path},
        }
        targets = [("direct", "plain", None, plain_backends[0].port), ("direct", "TLS", None, tls_backends[0].port)]
        for name, python in pythons.items():
            for mode in MODES:
                proc, port = run.start_target(running, name, pools[mode], python, args.workers)
                targets.append((name, mode, proc.pid, port))
        for target, mode, pid, port in targets:
            wait_ready(port, context if "TLS" in mode else None)
            if pid is not None:
                for pipeline in (run.PIPELINE, 1):  # warm-up: PyPy's JIT compiles here
                    run.redis_load(port, 30000 * max(1, args.workers), pipeline, 300,
                                   tls_args if "TLS" in mode else ())
        results = {}
        for _ in range(repeat):
            for target, mode, pid, port in targets:
                for pipeline in (run.PIPELINE, 1):
                    before = run.cpu_times(pid) if pid is not None else None
                    got = run.redis_load(port, requests, pipeline, 600, tls_args if "TLS" in mode else ())
                    cpu = None
                    if pid is not None:
                        cpu = sum(a - b for a, b in zip(run.cpu_times(pid), before)) * 1e6 / (requests * len(got))
                    rps = statistics.mean(r["rps"] for r in got.values())
                    results.setdefault((target, mode, pipeline), []).append((rps, cpu))
        print("| target | mode | pipeline | requests/s (set+get mean) | CPU us/request |")
        print("|---|---|---|---|---|")
        for (target, mode, pipeline), runs in results.items():
            runs.sort()
            rps, cpu = runs[len(runs) // 2]
            rows.append((target, mode, pipeline, rps, cpu))
            print("| %s | %s | P%d | %.0f | %s |" % (target, mode, pipeline, rps, "%.2f" % cpu if cpu else "—"))
    except run.BenchError as e:
        print("bench failed: %s" % (e,), file=sys.stderr)
        return 1
    finally:
        running.stop_all()
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
