"""
How long one huge multi-key request stalls everybody else.

Three backends (redis-server or memcached) on loopback, each target in front of
them with the README's example settings (timeout: 400, auto_eject_hosts: true,
server_failure_limit: 1, server_retry_timeout: 2000): nutcracker, then the proxy
(PyPy, CPython).  Per target and round: C{--clients} small clients send GETs one
at a time, and one more client sends one MGET (Redis) or get (memcached) of
C{--keys} keys.  The table shows how long the huge request took, whether its
reply was complete and correct, the other clients' worst and p99 latency while
it was under way (and before it, for the baseline), their errors, and the
target's ejections and timeouts from its stats port.

    python3 bench/stall.py                         # both protocols, 150000 keys
    python3 bench/stall.py --protocol redis --keys 1000000 --no-eject
    python3 bench/stall.py --only pypy --rounds 3

The first round of a PyPy target runs before its JIT has warmed up: it is the
round a real deployment sees first.  This is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
import socket
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

try:
    import redis  # noqa: F401  (tests.test_stats needs it)
    import yaml  # noqa: F401  (tests.support.processes needs it)
except ImportError:  # a bare python3: go on under the CPython venv, which has them
    _venv = os.path.join(ROOT, ".venv-cpython", "bin", "python")
    os.execv(_venv, [_venv] + sys.argv)

sys.path.insert(0, ROOT)
from tests.support import processes  # noqa: E402
from tests.support.huge import README_SETTINGS, key, value  # noqa: E402
from tests.test_stats import read_stats_port  # noqa: E402

HOST = processes.HOST
BACKENDS = 3
SETTINGS = README_SETTINGS


# -- wire helpers (blocking) ---------------------------------------------------------

def resp(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


def recv_until_count(sock, marker: bytes, count: int) -> None:
    """Read until C{marker} has been seen C{count} times (pipelined one-line replies)."""
    seen = 0
    tail = b""
    while seen < count:
        data = sock.recv(1 << 20)
        if not data:
            raise RuntimeError("connection closed while loading")
        data = tail + data
        seen += data.count(marker)
        tail = data[-len(marker) + 1:]


def load(port: int, protocol: str, keys: int) -> None:
    """Store every key through C{port} (nutcracker: the same placement as the proxy)."""
    with socket.create_connection((HOST, port)) as sock:
        for start in range(0, keys, 2000):
            stop = min(start + 2000, keys)
            if protocol == "redis":
                frames = [resp(b"SET", key(i), value(i)) for i in range(start, stop)]
                marker = b"+OK\r\n"
            else:
                frames = [b"set %s 0 0 %d\r\n%s\r\n" % (key(i), len(value(i)), value(i)) for i in range(start, stop)]
                marker = b"STORED\r\n"
            sock.sendall(b"".join(frames))
            recv_until_count(sock, marker, stop - start)


def expected_reply(protocol: str, keys: int) -> bytes:
    if protocol == "redis":
        return b"*%d\r\n" % keys + b"".join(b"$%d\r\n%s\r\n" % (len(value(i)), value(i)) for i in range(keys))
    return b"".join(b"VALUE %s 0 %d\r\n%s\r\n" % (key(i), len(value(i)), value(i)) for i in range(keys)) + b"END\r\n"


def huge(port: int, protocol: str, keys: int, go, results) -> None:
    """The child process sending the huge request once C{go} is set; puts (seconds, correct, detail)."""
    if protocol == "redis":
        request = resp(b"MGET", *[key(i) for i in range(keys)])
    else:
        request = b"get " + b" ".join(key(i) for i in range(keys)) + b"\r\n"
    want = expected_reply(protocol, keys)
    sock = socket.create_connection((HOST, port))
    go.wait()
    started = time.monotonic()
    sock.sendall(request)
    chunks = []
    got = 0
    sock.settimeout(30)
    try:
        while got < len(want):
            data = sock.recv(1 << 20)
            if not data:
                break
            chunks.append(data)
            got += len(data)
            if data.endswith(b"\r\n") and (data[:1] in (b"-",) or b"SERVER_ERROR" in data[-200:]) and got < len(want):
                break  # an error reply
    except socket.timeout:
        pass
    seconds = time.monotonic() - started
    reply = b"".join(chunks)
    sock.close()
    if reply == want:
        results.put((seconds, True, "%d bytes" % len(reply)))
    else:
        results.put((seconds, False, reply[:120].decode("latin-1", "replace")))


# -- the small clients (asyncio, in this process) --------------------------------------

async def small_client(port, protocol, index, stop, samples, errors):
    reader, writer = await asyncio.open_connection(HOST, port)
    k = key(index)
    request = resp(b"GET", k) if protocol == "redis" else b"get %s\r\n" % k
    while not stop.is_set():
        started = time.monotonic()
        writer.write(request)
        line = await reader.readline()
        ok = True
        if protocol == "redis":
            if line.startswith(b"$"):
                size = int(line[1:])
                if size >= 0:
                    await reader.readexactly(size + 2)
            else:
                ok = False
        else:
            while line not in (b"END\r\n", b""):
                if not line.startswith(b"VALUE "):
                    ok = False
                    break
                await reader.readexactly(int(line.split()[3]) + 2)
                line = await reader.readline()
            ok = ok and line == b"END\r\n"
        now = time.monotonic()
        samples.append((started, now - started))
        if not ok:
            errors.append((started, line.strip().decode("latin-1", "replace")))
        if not line:
            return
    writer.close()


async def measure(port, protocol, clients, go, results, settle=0.5):
    stop = asyncio.Event()
    samples, errors = [], []
    tasks = [asyncio.ensure_future(small_client(port, protocol, i, stop, samples, errors)) for i in range(clients)]
    await asyncio.sleep(settle)
    began = time.monotonic()
    go.set()
    loop = asyncio.get_event_loop()
    seconds, correct, detail = await loop.run_in_executor(None, results.get)
    ended = began + seconds
    await asyncio.sleep(settle)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    before = [lat for at, lat in samples if at < began]
    during = [lat for at, lat in samples if began <= at <= ended or (at < began and at + lat > began)]
    return {
        "huge_s": seconds, "correct": correct, "detail": detail,
        "before_max_ms": 1000 * max(before, default=0.0),
        "during_max_ms": 1000 * max(during, default=0.0),
        "during_p99_ms": 1000 * percentile(during, 0.99),
        "during_requests": len(during),
        "errors": len(errors), "first_error": errors[0][1] if errors else "",
    }


def percentile(values, q):
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stats(port: int) -> dict:
    """Ejections, timeouts and forward errors summed over the target's pools."""
    doc = read_stats_port(port, timeout=10)
    out = {"server_ejects": 0, "server_timedout": 0, "forward_error": 0}
    for pool in doc.values():
        if not isinstance(pool, dict) or "server_ejects" not in pool:
            continue
        out["server_ejects"] += pool["server_ejects"]
        out["forward_error"] += pool.get("forward_error", 0)
        for server in pool.values():
            if isinstance(server, dict):
                out["server_timedout"] += server.get("server_timedout", 0)
    return out


# -- targets ------------------------------------------------------------------------------

def start_target(name, python, backends, protocol, eject):
    port, stats_port = processes.free_port(), processes.free_port()
    pool = processes.pool_config([b.port for b in backends], port, redis=protocol == "redis", **SETTINGS)
    if not eject:
        pool["auto_eject_hosts"] = False
    args = ["-s", str(stats_port), "-a", HOST]
    if name == "nutcracker":
        path = processes.write_config({"bench": pool})
        proc = processes.Process(["nutcracker", "-c", path] + args, port)
    else:
        proc = processes.proxy({"bench": pool}, port, python=python, extra_args=args)
    return proc, port, stats_port


def python_for(name: str, venvs: str) -> str:
    return os.path.join(venvs, ".venv-" + name, "bin", "python")


def run(args) -> int:
    protocols = ["redis", "memcache"] if args.protocol == "all" else [args.protocol]
    targets = ["nutcracker"] + [name for name in args.only.split(",") if name]
    rows = []
    for protocol in protocols:
        factory = processes.redis_server if protocol == "redis" else processes.memcached
        extra = () if protocol == "redis" else ("-m", "1024")
        backends = [factory(None, *extra) for _ in range(BACKENDS)]
        try:
            loader, loader_port, _ = start_target("nutcracker", None, backends, protocol, False)
            try:
                load(loader_port, protocol, args.keys)
            finally:
                loader.stop()
            for name in targets:
                proc, port, stats_port = start_target(name, python_for(name, args.venvs), backends, protocol, not args.no_eject)
                try:
                    for round_ in range(1, args.rounds + 1):
                        processes.wait_for_port(port)
                        row = one_round(port, protocol, args)
                        row.update(stats(stats_port))
                        row.update(protocol=protocol, target=name, round=round_)
                        rows.append(row)
                        print_row(row)
                        time.sleep(2.2 if not args.no_eject else 0.1)  # past server_retry_timeout
                finally:
                    proc.stop()
        finally:
            for backend in backends:
                backend.stop()
    return 0


def one_round(port, protocol, args) -> dict:
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=huge, args=(port, protocol, args.keys, go, results))
    child.start()
    try:
        return asyncio.new_event_loop().run_until_complete(measure(port, protocol, args.clients, go, results))
    finally:
        child.join(5)
        if child.is_alive():
            child.terminate()


HEADER = "%-8s %-10s %5s %8s %7s %10s %10s %10s %7s %7s %8s %7s  %s" % (
    "protocol", "target", "round", "huge_s", "correct", "before_max", "during_max", "during_p99",
    "errors", "ejects", "timedout", "fwd_err", "first error / detail")


def print_row(row) -> None:
    if not getattr(print_row, "headed", False):
        print(HEADER)
        print_row.headed = True
    print("%-8s %-10s %5d %8.3f %7s %8.1fms %8.1fms %8.1fms %7d %7d %8d %7d  %s" % (
        row["protocol"], row["target"], row["round"], row["huge_s"], "yes" if row["correct"] else "NO",
        row["before_max_ms"], row["during_max_ms"], row["during_p99_ms"], row["errors"],
        row["server_ejects"], row["server_timedout"], row["forward_error"],
        row["first_error"] or ("" if row["correct"] else row["detail"])), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--protocol", choices=("redis", "memcache", "all"), default="all")
    parser.add_argument("--keys", type=int, default=150000, help="keys in the huge request (default 150000)")
    parser.add_argument("--clients", type=int, default=20, help="small clients (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="huge requests per target (default 2)")
    parser.add_argument("--only", default="pypy,cpython", help="proxy interpreters, comma-separated (default pypy,cpython)")
    parser.add_argument("--venvs", default=ROOT, help="the directory holding .venv-pypy and .venv-cpython")
    parser.add_argument("--no-eject", action="store_true", help="auto_eject_hosts: false")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
